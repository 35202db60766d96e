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
pub const LONGEST: usize = 8 * AVERAGE as usize;

const LEVEL: i32 = 3;

/// Whether the item with memo key `key`, the `len`-th of its chunk, ends it.
pub fn ends_chunk(key: &Digest, len: usize) -> bool {
    u32::from(u16::from_le_bytes([key.0[0], key.0[1]])) < CUT || len >= LONGEST
}

/// Whether a piece of content (an element's canonical JSON, a line of a file) ends a chunk cut by
/// content: a fast hash of its bytes (not a digest: it only places cuts) in one [`AVERAGE`]th of
/// the range. Cut so, a piece added, changed or removed changes the chunk it is in (and at most
/// the one after it), not the others.
pub fn content_ends_chunk(bytes: &[u8]) -> bool {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let (words, rest) = bytes.as_chunks::<8>();
    for word in words {
        h = (h ^ u64::from_le_bytes(*word)).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
    for &b in rest {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 31;
    h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h < u64::MAX / u64::from(AVERAGE)
}

/// Under what a chunk of elements' listing is kept ([`crate::StageInput::kept`]): the stage (its
/// fingerprint without the input the elements are from), and the elements (`bytes`, each ending at
/// one of `ends`).
pub fn elements_key(stage: &Digest, bytes: &[u8], ends: &[usize]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"elements\0");
    h.update(&Listing::FORMAT.to_le_bytes());
    h.update(&stage.0);
    h.update(&(ends.len() as u64).to_le_bytes());
    for end in ends {
        h.update(&(*end as u64).to_le_bytes());
    }
    h.update(bytes);
    Digest(*h.finalize().as_bytes())
}

/// What a chunk of elements listed, as kept: its items' chunk of results (its key, [`chunk_key`]),
/// how many items, and how many of them are in each group ([`crate::item_group`]). A rerun that
/// finds the chunk of results kept counts the items as cached without knowing their keys.
#[derive(Debug, PartialEq)]
pub struct Listing {
    pub results: Digest,
    pub items: usize,
    pub groups: Vec<(String, usize)>,
}

impl Listing {
    /// Bumped when what is kept changes: listings kept before are then not found.
    const FORMAT: u32 = 1;

    /// The listing of these items (memo key, id), in order.
    pub fn of<'a>(items: impl ExactSizeIterator<Item = (&'a Digest, &'a str)> + Clone) -> Listing {
        let mut groups: Vec<(String, usize)> = Vec::new();
        for (_, id) in items.clone() {
            if let Some(name) = crate::item_group(id) {
                match groups.iter_mut().find(|(g, _)| g == name) {
                    Some((_, n)) => *n += 1,
                    None => groups.push((name.to_string(), 1)),
                }
            }
        }
        Listing { results: chunk_key(items.clone().map(|(key, _)| key)), items: items.len(), groups }
    }

    /// As kept: the chunk of results' key and the number of items, then a record per group.
    pub fn encode(&self) -> Vec<Vec<u8>> {
        let head = [&self.results.0[..], &(self.items as u64).to_le_bytes()].concat();
        std::iter::once(head).chain(self.groups.iter().map(|(name, n)| [&(*n as u64).to_le_bytes()[..], name.as_bytes()].concat())).collect()
    }

    /// See [`Self::encode`].
    pub fn decode(records: &[Vec<u8>]) -> Option<Listing> {
        let (head, groups) = records.split_first()?;
        let (results, items) = head.split_first_chunk::<32>()?;
        let groups = groups
            .iter()
            .map(|g| {
                let (n, name) = g.split_first_chunk::<8>()?;
                Some((std::str::from_utf8(name).ok()?.to_string(), u64::from_le_bytes(*n) as usize))
            })
            .collect::<Option<_>>()?;
        Some(Listing { results: Digest(*results), items: u64::from_le_bytes(items.try_into().ok()?) as usize, groups })
    }
}

/// The chunks of items with these memo keys, in order: each one's range of positions (as a
/// listing cuts them, [`ends_chunk`]).
#[cfg(test)]
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

/// Where records a stage keeps ([`crate::StageInput::kept`]) are, in the same table: the stage's
/// key in a domain of its own, so that it never names a chunk of results.
pub(super) fn kept_key(key: &Digest) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"kept\0");
    h.update(&key.0);
    Digest(*h.finalize().as_bytes())
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

/// A chunk's results from its stored value, if it holds exactly `n` (any number: `None`).
pub(super) fn decode(stored: &[u8], n: Option<usize>) -> Option<Vec<Vec<u8>>> {
    thread_local! {
        // One decompression context a thread, not one a chunk.
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
    }
    // The frame says how long its content is (a chunk is compressed in one piece).
    let len = usize::try_from(zstd::zstd_safe::get_frame_content_size(stored).ok()??).ok().filter(|&len| len <= 1 << 30)?;
    let plain = DECOMPRESSOR.with_borrow_mut(|d| {
        let d = match d {
            Some(d) => d,
            None => d.insert(zstd::bulk::Decompressor::new().ok()?),
        };
        d.decompress(stored, len).ok().filter(|plain| plain.len() == len)
    })?;
    let mut results = Vec::with_capacity(n.unwrap_or(0));
    let mut rest = &plain[..];
    while !rest.is_empty() {
        let (len, after) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        results.push(after.get(..len)?.to_vec());
        rest = &after[len..];
    }
    n.is_none_or(|n| results.len() == n).then_some(results)
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
    fn a_listing_reads_back_as_kept() {
        let keys = keys(5);
        let ids = ["a/1", "b", "a/2", "c/x/y", "a/3"];
        let listing = Listing::of(keys.iter().zip(ids));
        assert_eq!((listing.items, listing.results), (5, chunk_key(keys.iter())));
        assert_eq!(listing.groups, [("a".to_string(), 3), ("c".to_string(), 1)]);
        assert_eq!(Listing::decode(&listing.encode()), Some(listing));
        assert_eq!(Listing::decode(&[]), None);
        assert_eq!(Listing::decode(&[vec![0; 39]]), None);
    }

    #[test]
    fn a_chunk_decodes_to_its_results_and_only_with_their_number() {
        let results = vec![b"{\"a\":1}".to_vec(), Vec::new(), b"[2]".to_vec()];
        let stored = encode(&results).unwrap();
        assert_eq!(decode(&stored, Some(3)), Some(results.clone()));
        assert_eq!(decode(&stored, None), Some(results));
        assert_eq!(decode(&stored, Some(2)), None);
        assert_eq!(decode(&stored[..stored.len() - 1], Some(3)), None);
    }
}
