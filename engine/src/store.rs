//! The project-local store (default: `.pipeline/` beside the pipeline file).
//!
//! ```text
//! objects/ab/cdef…    artifacts, content-addressed by the BLAKE3 of their bytes
//! done/ab/cdef…       fingerprint digest → output digest: "this stage result is complete"
//! items/ab/cdef…      per-item memo: item key → the item's JSON result
//! records/<pipeline>/<stage>.json   last fingerprint of each stage, to explain staleness
//! runs/<pipeline>.json              the last run: every iteration's stage outputs
//! tmp/                staging for atomic writes
//! lock                held by a running `pipeline run`
//! ```
//!
//! Every write goes to `tmp/` and is renamed into place, so a killed process leaves either the
//! old file or the new one, never a torn one. Results are written before the `done` marker that
//! points at them. Reads verify: an object whose bytes do not hash to its name, or a memo entry
//! that does not parse, is treated as absent and recomputed.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::hash::{Digest, canonical_json};

/// Fault injection for the crash tests (`tests/cli/crash.rs`): with `PIPELINE_CRASH_AT_WRITE=N`
/// the process aborts in the middle of its N-th store write (half the temporary file written, not
/// renamed), as a `kill -9` at the worst moment would leave it. Unset, it costs one atomic add.
mod crash_test {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static AT: OnceLock<Option<u64>> = OnceLock::new();
    static WRITES: AtomicU64 = AtomicU64::new(0);

    pub fn at_this_write() -> bool {
        let at = *AT.get_or_init(|| std::env::var("PIPELINE_CRASH_AT_WRITE").ok().and_then(|v| v.parse().ok()));
        at.is_some_and(|n| WRITES.fetch_add(1, Ordering::SeqCst) + 1 == n)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "another `pipeline run` is using the store {0} (lock held on {0}/lock)\n  wait for it to finish, or stop it; finished work is kept either way"
    )]
    Locked(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// A stage result: the artifact's digest, and the digest without its measured fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outputs {
    pub full: Digest,
    pub stable: Digest,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Exclusive use of a store, released on drop.
pub struct StoreLock {
    file: File,
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl Store {
    /// Opening does not touch the disk; directories are created on first write.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Take the store for writing; refuses at once when another process holds it.
    pub fn lock(&self) -> Result<StoreLock, StoreError> {
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let path = self.root.join("lock");
        let file = File::options().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(StoreLock { file }),
            Err(fs::TryLockError::WouldBlock) => Err(StoreError::Locked(self.root.clone())),
            Err(fs::TryLockError::Error(e)) => Err(StoreError::Io { path, source: e }),
        }
    }

    fn sharded(&self, dir: &str, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join(dir).join(&hex[..2]).join(&hex[2..])
    }

    /// Write `bytes` to `path` atomically, staged in `tmp/` ([`crate::atomic`]).
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        crate::atomic::write_staged(path, &self.root.join("tmp"), |f| {
            if crash_test::at_this_write() {
                // Half the bytes, then die: the torn write a kill can leave.
                let _ = f.write_all(&bytes[..bytes.len() / 2]);
                std::process::abort();
            }
            f.write_all(bytes)
        })
        .map_err(io_err(path))
    }

    /// Store an artifact; returns its digest.
    pub fn put_object(&self, value: &Value) -> Result<Digest, StoreError> {
        let bytes = canonical_json(value);
        let digest = Digest::of_bytes(&bytes);
        let path = self.sharded("objects", &digest);
        if !path.exists() {
            self.write_atomic(&path, &bytes)?;
        }
        Ok(digest)
    }

    pub fn has_object(&self, digest: &Digest) -> bool {
        self.sharded("objects", digest).is_file()
    }

    /// An artifact, verified against its digest. `None` if absent or damaged.
    pub fn get_object(&self, digest: &Digest) -> Option<Value> {
        self.get_object_as(digest)
    }

    /// An object read straight into `T`: a part of a large artifact (its `summary`) without
    /// building the whole of it as a `Value`.
    pub fn get_object_as<T: serde::de::DeserializeOwned>(&self, digest: &Digest) -> Option<T> {
        let bytes = fs::read(self.sharded("objects", digest)).ok()?;
        if Digest::of_bytes(&bytes) != *digest {
            tracing::warn!(object = %digest, "damaged object in store; it will be recomputed");
            return None;
        }
        serde_json::from_slice(&bytes).ok()
    }

    /// The output recorded for a fingerprint, if that result is complete and still present.
    pub fn get_done(&self, fingerprint: &Digest) -> Option<Outputs> {
        let text = fs::read_to_string(self.sharded("done", fingerprint)).ok()?;
        let mut lines = text.lines();
        let full: Digest = lines.next()?.parse().ok()?;
        let stable: Digest = lines.next()?.parse().ok()?;
        self.has_object(&full).then_some(Outputs { full, stable })
    }

    pub fn put_done(&self, fingerprint: &Digest, output: &Outputs) -> Result<(), StoreError> {
        self.write_atomic(&self.sharded("done", fingerprint), format!("{}\n{}\n", output.full, output.stable).as_bytes())
    }

    pub fn get_item(&self, key: &Digest) -> Option<Value> {
        let bytes = fs::read(self.sharded("items", key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn has_item(&self, key: &Digest) -> bool {
        self.sharded("items", key).is_file()
    }

    pub fn put_item(&self, key: &Digest, value: &Value) -> Result<(), StoreError> {
        self.write_atomic(&self.sharded("items", key), &canonical_json(value))
    }

    fn record_path(&self, pipeline: &str, stage: &str) -> PathBuf {
        self.root.join("records").join(pipeline).join(format!("{stage}.json"))
    }

    pub fn get_record<T: DeserializeOwned>(&self, pipeline: &str, stage: &str) -> Option<T> {
        read_json(&self.record_path(pipeline, stage))
    }

    pub fn put_record<T: Serialize>(&self, pipeline: &str, stage: &str, record: &T) -> Result<(), StoreError> {
        self.write_json(&self.record_path(pipeline, stage), record)
    }

    fn run_path(&self, pipeline: &str) -> PathBuf {
        self.root.join("runs").join(format!("{pipeline}.json"))
    }

    pub fn get_run<T: DeserializeOwned>(&self, pipeline: &str) -> Option<T> {
        read_json(&self.run_path(pipeline))
    }

    pub fn put_run<T: Serialize>(&self, pipeline: &str, run: &T) -> Result<(), StoreError> {
        self.write_json(&self.run_path(pipeline), run)
    }

    fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec_pretty(value).expect("records serialize");
        bytes.push(b'\n');
        self.write_atomic(path, &bytes)
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_are_verified_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let d = store.put_object(&json!({"a": 1})).unwrap();
        assert_eq!(store.get_object(&d), Some(json!({"a": 1})));
        // Damage it: it reads as absent, and a done marker pointing at it is not trusted.
        fs::write(store.sharded("objects", &d), b"{\"a\":2}").unwrap();
        assert_eq!(store.get_object(&d), None);
        let fp = Digest::of_bytes(b"fp");
        let missing = Digest::of_bytes(b"missing");
        store.put_done(&fp, &Outputs { full: missing, stable: missing }).unwrap();
        assert_eq!(store.get_done(&fp), None);
    }

    #[test]
    fn second_lock_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("s"));
        let held = store.lock().unwrap();
        assert!(matches!(Store::new(dir.path().join("s")).lock(), Err(StoreError::Locked(_))));
        drop(held);
        assert!(store.lock().is_ok());
    }
}
