//! Downloading a pinned Hugging Face repository into the local Hugging Face cache, with hf-hub
//! (the client mistral.rs itself uses), where this machine reaches the hub. The files are then
//! verified against the catalog's sha256s like any other weights (`catalog::fetch::resolve`).
//!
//! Not exercised by the test suite: the machines it runs on reach no hub. What is tested is
//! the other half, reading a pinned repository from a cache laid out as the hub's client lays
//! it out (`catalog::fetch::hf_snapshot`).

use catalog::Source;

/// Fetch every pinned file of `source` into the cache. `HF_HUB_OFFLINE=1` forbids it.
pub fn download(source: &Source) -> Result<(), String> {
    let Source::HuggingFace { repo, revision: Some(revision), files: Some(files), .. } = source else {
        return Err("only a pinned Hugging Face source is downloaded".into());
    };
    let cache = catalog::fetch::hf_hub_cache();
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
        return Err(format!("{repo} at {revision} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE=1 forbids downloading it", cache.display()));
    }
    tracing::info!(repo, revision, cache = %cache.display(), "downloading from the Hugging Face hub");
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache.clone())
        .with_progress(true)
        .build()
        .map_err(|e| format!("Hugging Face hub client: {e}"))?;
    let remote = api.repo(hf_hub::Repo::with_revision(repo.clone(), hf_hub::RepoType::Model, revision.clone()));
    for name in files.keys() {
        remote.get(name).map_err(|e| {
            format!("downloading `{name}` of {repo} at {revision} into {}: {e} (with no access to the hub, put the repository in that cache by other means)", cache.display())
        })?;
    }
    Ok(())
}
