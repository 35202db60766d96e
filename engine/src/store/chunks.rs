//! Chunks: a stage's consecutive items' results kept together, so that a rerun over a million
//! items of which one changed looks up a thousand chunks, not a million items.
//!
//! A stage's items are cut into chunks by their memo keys alone: a chunk ends after an item whose key
//! starts with a value below [`CUT`] (one key in [`AVERAGE`], keys being digests), or once it
//! holds [`LONGEST`] items. The cuts depend on the keys, not on positions, so an item added,
//! changed or removed changes the chunk it is in and leaves the others as they were (as
//! content-defined chunking cuts a file). A chunk's key is the digest of its items' keys: the same
//! items give the same chunk, and a chunk found holds exactly the results those items' rows hold.
//!
//! A chunk is written once all its items are memoized, as their results are read back to write the
//! stage's output; it is never the only copy of a result (each item keeps its own row, committed
//! as it finished), so a chunk that is damaged or missing only costs reading the items one by one.
//! Its value is Zstandard-compressed: each result's length (u32, little-endian), then its bytes;
//! the digest stored beside it is of the stored bytes, checked on every read.

use crate::hash::Digest;

pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS chunks (key BLOB PRIMARY KEY, digest BLOB NOT NULL, value BLOB NOT NULL) WITHOUT ROWID";

/// Items in a chunk, on average...
const AVERAGE: u32 = 1024;
/// ... from the keys that end one ...
const CUT: u32 = (1 << 16) / AVERAGE;
/// ... and at most.
const LONGEST: usize = 8 * AVERAGE as usize;

const LEVEL: i32 = 3;

/// Whether the item with memo key `key`, the `len`-th of its chunk, ends it.
pub fn ends_chunk(key: &Digest, len: usize) -> bool {
    u32::from(u16::from_le_bytes([key.0[0], key.0[1]])) < CUT || len >= LONGEST
}

/// The chunks of items with these memo keys, in order: each one's range of positions.
pub fn chunks(keys: &[Digest]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start == keys.len() {
            return None;
        }
        let end = start + keys[start..].iter().enumerate().position(|(i, key)| ends_chunk(key, i + 1)).map_or(keys.len() - start, |i| i + 1);
        Some(std::mem::replace(&mut start, end)..end)
    })
}

/// A chunk's key: the digest of its items' keys.
pub fn chunk_key<'a>(keys: impl ExactSizeIterator<Item = &'a Digest>) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"chunk\0");
    h.update(&(keys.len() as u64).to_le_bytes());
    for key in keys {
        h.update(&key.0);
    }
    Digest(*h.finalize().as_bytes())
}

/// The stored value of a chunk of these results.
pub(super) fn encode(results: &[Vec<u8>]) -> std::io::Result<Vec<u8>> {
    let mut plain = Vec::with_capacity(results.iter().map(|r| r.len() + 4).sum());
    for result in results {
        plain.extend_from_slice(&u32::try_from(result.len()).map_err(std::io::Error::other)?.to_le_bytes());
        plain.extend_from_slice(result);
    }
    zstd::bulk::compress(&plain, LEVEL)
}

/// A chunk's results from its stored value, if it holds exactly `n`.
pub(super) fn decode(stored: &[u8], n: usize) -> Option<Vec<Vec<u8>>> {
    let plain = zstd::stream::decode_all(stored).ok()?;
    let mut results = Vec::with_capacity(n);
    let mut rest = &plain[..];
    while !rest.is_empty() {
        let (len, after) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        results.push(after.get(..len)?.to_vec());
        rest = &after[len..];
    }
    (results.len() == n).then_some(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<Digest> {
        (0..n).map(|i| Digest::of_bytes(&(i as u64).to_le_bytes())).collect()
    }

    #[test]
    fn chunks_are_cut_by_the_keys_so_one_item_added_changes_one_chunk() {
        let before = keys(20_000);
        let chunks_before: Vec<_> = chunks(&before).collect();
        assert_eq!(chunks_before.first().unwrap().start, 0);
        assert_eq!(chunks_before.last().unwrap().end, before.len());
        assert!(chunks_before.windows(2).all(|w| w[0].end == w[1].start));
        assert!((8..=60).contains(&chunks_before.len()), "about one in {AVERAGE} keys cuts: {} chunks", chunks_before.len());
        // An item inserted in the middle: only the chunk it lands in changes.
        let mut after = before.clone();
        after.insert(10_000, Digest::of_bytes(b"new"));
        let digests = |keys: &[Digest]| chunks(keys).map(|r| chunk_key(keys[r].iter())).collect::<std::collections::HashSet<_>>();
        let (old, new) = (digests(&before), digests(&after));
        assert!(new.difference(&old).count() <= 2 && old.difference(&new).count() <= 1, "{} of {} chunks changed", new.difference(&old).count(), new.len());
    }

    #[test]
    fn a_chunk_is_at_most_the_longest() {
        // Keys that never cut.
        let never: Vec<Digest> = (0..)
            .map(|i: u64| Digest::of_bytes(&i.to_le_bytes()))
            .filter(|k| !ends_chunk(k, 1))
            .take(LONGEST * 2 + 5)
            .collect();
        assert_eq!(chunks(&never).map(|r| r.len()).collect::<Vec<_>>(), [LONGEST, LONGEST, 5]);
    }

    #[test]
    fn a_chunk_decodes_to_its_results_and_only_with_their_number() {
        let results = vec![b"{\"a\":1}".to_vec(), Vec::new(), b"[2]".to_vec()];
        let stored = encode(&results).unwrap();
        assert_eq!(decode(&stored, 3), Some(results));
        assert_eq!(decode(&stored, 2), None);
        assert_eq!(decode(&stored[..stored.len() - 1], 3), None);
    }
}
