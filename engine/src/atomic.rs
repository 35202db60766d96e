//! The one way a file is replaced: its bytes go to a temporary file, which is synced and renamed
//! over the target, and then the directory is synced. A crash or a kill at any point leaves the
//! old file or the new one, never a torn one, and a finished write survives a power cut.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replace `path` with `bytes`, staging beside it (same directory, so the rename cannot cross
/// filesystems). Creates the directory.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    write_staged(path, dir, |f| f.write_all(bytes))
}

/// Replace `path` with what `fill` writes, staged in `staging` (on the same filesystem).
pub fn write_staged(path: &Path, staging: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> io::Result<()> {
    fs::create_dir_all(staging)?;
    let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = staged(staging, &name);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        commit(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A fresh name in `staging` for a file that will become `name`.
pub fn staged(staging: &Path, name: &str) -> std::path::PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    staging.join(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Puts the synced file `tmp` in place as `path` (creating its directory) and syncs the directory.
pub fn commit(tmp: &Path, path: &Path) -> io::Result<()> {
    let dir = parent(path);
    fs::create_dir_all(dir)?;
    fs::rename(tmp, path)?;
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_file_and_leaves_nothing_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("f.txt");
        super::write(&path, b"one").unwrap();
        super::write(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["f.txt"]);
        // A failed write (its directory is a file) leaves the target as it was.
        let blocked = dir.path().join("sub").join("f.txt").join("g");
        assert!(super::write(&blocked, b"x").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
    }
}
