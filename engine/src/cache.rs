//! The per-machine cache: what is worth keeping between runs of any pipeline on this machine and
//! can always be computed again (a passed check of a large file). Content-addressed, written
//! atomically; deleting it costs time, never a result.

use std::path::PathBuf;
use std::sync::OnceLock;

/// `sub` in the cache: `$PIPELINE_CACHE_DIR`, else `$XDG_CACHE_HOME/pipeline`, else
/// `~/.cache/pipeline`.
pub fn dir(sub: &str) -> PathBuf {
    let base = match std::env::var_os("PIPELINE_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache"))
            .join("pipeline"),
    };
    base.join(sub)
}

/// What identifies this build of the program (its executable's path, size and modification time):
/// a result this build remembered is not trusted by another, whose code may compute it otherwise.
pub fn build_identity() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let exe = std::env::current_exe().ok();
        let meta = exe.as_ref().and_then(|e| std::fs::metadata(e).ok());
        let modified = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        format!("{}:{}:{}", exe.map(|e| e.display().to_string()).unwrap_or_default(), meta.map_or(0, |m| m.len()), modified.map_or(0, |d| d.as_nanos()))
    })
}
