//! Stable hashing: BLAKE3 over a canonical JSON encoding (object keys sorted by code point, no
//! whitespace, serde_json's number formatting). The encoding never depends on map insertion
//! order, so it is the same whichever serde_json features other crates enable.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// A BLAKE3 digest, shown and stored as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of_bytes(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    pub fn of_json(value: &Value) -> Digest {
        Digest::of_bytes(&canonical_json(value))
    }

    pub fn of<T: Serialize>(value: &T) -> Digest {
        Digest::of_json(&serde_json::to_value(value).expect("fingerprint types serialize to JSON"))
    }

    /// A file's digest, hashed as it is read (a large file is never held). Within one process a
    /// large file (8 MiB and more) is hashed once while it is unchanged: the build's checks and
    /// the run both ask, and a million-line dataset costs a tenth of a second each time.
    /// Unchanged means the same inode, size, modification and change times (nanoseconds) as when
    /// it was hashed, seen before and after the hashing. Times are stamped by a clock that ticks
    /// every few milliseconds, so a write of the same length within a tick of the hashing may go
    /// unseen here: a stage's `file_reader` verifies what it reads against the digest, so such a
    /// file fails the run there ("changed while the pipeline ran"), never taken for the one hashed.
    pub fn of_file(path: &std::path::Path) -> std::io::Result<Digest> {
        static HASHED: std::sync::Mutex<Vec<(FileStamp, Digest)>> = std::sync::Mutex::new(Vec::new());
        let file = std::fs::File::open(path)?;
        let before = FileStamp::of(&file.metadata()?).filter(|stamp| stamp.len >= 8 << 20);
        if let Some((_, d)) = HASHED.lock().expect("not poisoned").iter().find(|(stamp, _)| Some(stamp) == before.as_ref()) {
            return Ok(*d);
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(&file)?;
        let digest = Digest(*hasher.finalize().as_bytes());
        if let Some(stamp) = before.filter(|before| file.metadata().ok().and_then(|m| FileStamp::of(&m)).as_ref() == Some(before)) {
            let mut hashed = HASHED.lock().expect("not poisoned");
            hashed.retain(|(s, _)| (s.dev, s.ino) != (stamp.dev, stamp.ino));
            hashed.push((stamp, digest));
        }
        Ok(digest)
    }

    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The first 12 hex digits, for humans.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

/// What [`Digest::of_file`] takes to mean a file is unchanged (`None` where it cannot tell).
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl FileStamp {
    #[cfg(unix)]
    fn of(meta: &std::fs::Metadata) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        meta.is_file().then(|| FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    #[cfg(not(unix))]
    fn of(_: &std::fs::Metadata) -> Option<FileStamp> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
#[error("not a digest (expected 64 hex digits): {0:?}")]
pub struct BadDigest(String);

impl FromStr for Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadDigest(s.chars().take(80).collect()));
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(chunk).unwrap(), 16).map_err(|_| BadDigest(s.into()))?;
        }
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Canonical JSON bytes of a value.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_canonical(value, &mut out);
    out
}

pub(crate) fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("writing to a Vec cannot fail");
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("writing to a Vec cannot fail"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_encoding_sorts_keys_and_is_pinned() {
        let a = json!({"b": 1, "a": [true, null, 1.5, "x"], "c": {"z": 1, "y": 2}});
        assert_eq!(
            String::from_utf8(canonical_json(&a)).unwrap(),
            r#"{"a":[true,null,1.5,"x"],"b":1,"c":{"y":2,"z":1}}"#
        );
        assert_eq!(Digest::of_json(&a).hex(), "efbe695fa0023069284a6476e04e24520f8429b71522442fc94955e7d5061011");
    }

    #[test]
    fn a_file_changed_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        // Large files are remembered: these are, as far as the digests tell.
        let large = |text: &[u8]| [text, &vec![b' '; 8 << 20][..]].concat();
        let (one, two, three, six) = (large(b"one"), large(b"two"), large(b"three"), large(b"six"));
        std::fs::write(&path, &one).unwrap();
        assert_eq!(Digest::of_file(&path).unwrap(), Digest::of_bytes(&one));
        assert_eq!(Digest::of_file(&path).unwrap(), Digest::of_bytes(&one));
        // The same length: its times tell it apart (set here, as the clock files are stamped by
        // may not have ticked since the first write).
        std::fs::write(&path, &two).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(std::time::UNIX_EPOCH).unwrap();
        assert_eq!(Digest::of_file(&path).unwrap(), Digest::of_bytes(&two));
        std::fs::write(&path, &three).unwrap();
        assert_eq!(Digest::of_file(&path).unwrap(), Digest::of_bytes(&three));
        std::fs::rename(dir.path().join("data"), dir.path().join("moved")).unwrap();
        std::fs::write(&path, &six).unwrap();
        assert_eq!(Digest::of_file(&path).unwrap(), Digest::of_bytes(&six));
        assert_eq!(Digest::of_file(&dir.path().join("moved")).unwrap(), Digest::of_bytes(&three));
    }

    #[test]
    fn digest_round_trips_through_hex() {
        let d = Digest::of_bytes(b"hello");
        assert_eq!(d.hex(), "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f");
        assert_eq!(d.hex().parse::<Digest>().unwrap(), d);
        assert!("xyz".parse::<Digest>().is_err());
        assert!("é".repeat(32).parse::<Digest>().is_err());
    }
}
