//! Item values compressed with a Zstandard dictionary per stage.
//!
//! An item's value is small (a sample, a rendered prompt, an answer: ~100–300 bytes) and shares
//! most of its bytes with its stage's other items (the same keys, the same template). Compressed
//! alone it barely shrinks; against a dictionary trained on its stage's first values it shrinks
//! about 4× (145 → 34 bytes for a rendered prompt). So each stage (a *family*) keeps its first
//! [`TRAIN_AT_VALUES`] values (at most [`TRAIN_AT_BYTES`]) in memory as they are written, plain;
//! then a dictionary is trained on them, stored in the `dicts` table in the same transaction as
//! the first value compressed with it, and used for the family's values from then on, in this
//! run and the next ones. A family whose values do not train a dictionary keeps writing them
//! plain.
//!
//! A compressed value is a Zstandard frame that names its dictionary's id; a plain one is JSON,
//! which never starts with a frame's magic number, so both read back the same way and values
//! written before dictionaries existed read as they are. The digest stored beside a value is of
//! the stored bytes, so checking that a value is intact costs no decompression. A dictionary row
//! carries its own digest and is checked when it is loaded: a damaged dictionary makes the values
//! that need it read as absent (recomputed), never as something else.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use zstd::zstd_safe::{self, CCtx, CDict, DCtx, DDict};

use super::ZSTD_MAGIC;
use crate::hash::Digest;

/// Values a family keeps before training (fewer if they reach [`TRAIN_AT_BYTES`] first).
const TRAIN_AT_VALUES: usize = 2_000;
const TRAIN_AT_BYTES: usize = 1 << 20;
/// The largest dictionary trained: more rarely pays for values this small.
const DICT_BYTES: usize = 16 << 10;
const LEVEL: i32 = 3;

pub(super) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS dicts (id INTEGER PRIMARY KEY, family TEXT NOT NULL, digest BLOB NOT NULL, dict BLOB NOT NULL)";

enum Family {
    /// Values seen so far, concatenated, and their sizes.
    Learning { samples: Vec<u8>, sizes: Vec<usize> },
    /// `stored`: the dictionary's row is committed (false: it goes in with the next values).
    Trained { id: NonZeroU32, dict: Vec<u8>, cdict: CDict<'static>, stored: bool },
    /// No dictionary could be trained: values are written plain.
    Plain,
}

#[derive(Default)]
struct State {
    families: HashMap<String, Family>,
    /// Dictionaries for reading, by id; `None`: missing or damaged.
    readers: HashMap<u32, Option<Arc<DDict<'static>>>>,
    cctx: Option<CCtx<'static>>,
    dctx: Option<DCtx<'static>>,
}

/// The store's dictionaries, loaded and trained as they are needed (shared by a store's clones).
#[derive(Default)]
pub(super) struct Dicts {
    state: Mutex<State>,
}

impl std::fmt::Debug for Dicts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dicts").finish_non_exhaustive()
    }
}

/// A value ready to be written, and the dictionary row that must be written with it, if any.
pub(super) struct Encoded<'a> {
    pub bytes: std::borrow::Cow<'a, [u8]>,
    pub new_dict: Option<(NonZeroU32, Vec<u8>)>,
}

impl Dicts {
    /// The bytes to store for `value` (canonical JSON) of `family`. `db` is the writer's
    /// connection, read for a dictionary trained by an earlier run.
    pub(super) fn encode<'a>(&self, db: &rusqlite::Connection, family: &str, value: &'a [u8]) -> Encoded<'a> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State { families, cctx, .. } = &mut *state;
        if !families.contains_key(family) {
            families.insert(family.to_string(), load_family(db, family));
        }
        let entry = families.get_mut(family).expect("inserted");
        if let Family::Learning { samples, sizes } = entry {
            samples.extend_from_slice(value);
            sizes.push(value.len());
            if sizes.len() >= TRAIN_AT_VALUES || samples.len() >= TRAIN_AT_BYTES {
                *entry = train(samples, sizes);
                if let Family::Trained { id, .. } = entry {
                    tracing::debug!(family, dict = id.get(), "trained an item dictionary");
                }
            }
            return Encoded { bytes: value.into(), new_dict: None };
        }
        let Family::Trained { id, dict, cdict, stored } = entry else { return Encoded { bytes: value.into(), new_dict: None } };
        let cctx = cctx.get_or_insert_with(CCtx::create);
        let mut out = Vec::with_capacity(zstd_safe::compress_bound(value.len()));
        match cctx.compress_using_cdict(&mut out, value, cdict) {
            Ok(_) if out.len() < value.len() => {
                Encoded { bytes: out.into(), new_dict: (!*stored).then(|| (*id, dict.clone())) }
            }
            _ => Encoded { bytes: value.into(), new_dict: None },
        }
    }

    /// The dictionary `id` of `family` is committed.
    pub(super) fn stored(&self, family: &str, id: NonZeroU32) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Family::Trained { id: trained, stored, .. }) = state.families.get_mut(family)
            && *trained == id
        {
            *stored = true;
        }
    }

    /// A dictionary id already taken by another dictionary (a collision of two random ids):
    /// the family writes plain from now on.
    pub(super) fn refuse(&self, family: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.families.insert(family.to_string(), Family::Plain);
    }

    /// Whether a stored value can be read: plain, or its dictionary is present and intact.
    pub(super) fn readable(&self, db: &rusqlite::Connection, stored: &[u8]) -> bool {
        !stored.starts_with(&ZSTD_MAGIC) || zstd_safe::get_dict_id_from_frame(stored).is_none_or(|id| self.reader(db, id).is_some())
    }

    /// A stored value's JSON bytes; `None` if its dictionary is missing or damaged, or it does not
    /// decompress.
    pub(super) fn decode(&self, db: &rusqlite::Connection, stored: Vec<u8>) -> Option<Vec<u8>> {
        if !stored.starts_with(&ZSTD_MAGIC) {
            return Some(stored);
        }
        let Some(id) = zstd_safe::get_dict_id_from_frame(&stored) else { return zstd::stream::decode_all(&stored[..]).ok() };
        let ddict = self.reader(db, id)?;
        let size = zstd_safe::get_frame_content_size(&stored).ok()??;
        let mut out = Vec::with_capacity(usize::try_from(size).ok()?);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let dctx = state.dctx.get_or_insert_with(DCtx::create);
        dctx.decompress_using_ddict(&mut out, &stored, &ddict).ok()?;
        Some(out)
    }

    fn reader(&self, db: &rusqlite::Connection, id: NonZeroU32) -> Option<Arc<DDict<'static>>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .readers
            .entry(id.get())
            .or_insert_with(|| {
                let (digest, dict) = db
                    .query_row("SELECT digest, dict FROM dicts WHERE id = ?1", [id.get()], |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?)))
                    .ok()?;
                if digest != Digest::of_bytes(&dict).0 {
                    tracing::warn!(dict = id.get(), "damaged item dictionary in store; the items compressed with it will be recomputed");
                    return None;
                }
                Some(Arc::new(zstd_safe::create_ddict(&dict)))
            })
            .clone()
    }
}

/// The family's dictionary from an earlier run, or a family still learning.
fn load_family(db: &rusqlite::Connection, family: &str) -> Family {
    let row = db.query_row("SELECT id, digest, dict FROM dicts WHERE family = ?1 ORDER BY id LIMIT 1", [family], |row| {
        Ok((row.get::<_, u32>(0)?, row.get::<_, Vec<u8>>(1)?, row.get::<_, Vec<u8>>(2)?))
    });
    match row {
        Ok((id, digest, dict)) => match NonZeroU32::new(id) {
            Some(id) if digest == Digest::of_bytes(&dict).0 => Family::Trained { id, cdict: zstd_safe::create_cdict(&dict, LEVEL), dict, stored: true },
            // Damaged: its values read as absent; new ones are written plain.
            _ => Family::Plain,
        },
        Err(_) => Family::Learning { samples: Vec::new(), sizes: Vec::new() },
    }
}

fn train(samples: &[u8], sizes: &[usize]) -> Family {
    let mut dict = Vec::with_capacity(DICT_BYTES.min(samples.len() / 8).max(256));
    match zstd_safe::train_from_buffer(&mut dict, samples, sizes) {
        Ok(_) => match zstd_safe::get_dict_id_from_dict(&dict) {
            Some(id) => Family::Trained { id, cdict: zstd_safe::create_cdict(&dict, LEVEL), dict, stored: false },
            None => Family::Plain,
        },
        Err(code) => {
            tracing::debug!(samples = sizes.len(), bytes = samples.len(), "no item dictionary: {}", zstd_safe::get_error_name(code));
            Family::Plain
        }
    }
}
