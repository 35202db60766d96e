//! The project-local store (default: `.pipeline/` beside the pipeline file).
//!
//! ```text
//! objects/ab/cdef…    artifacts, content-addressed by the BLAKE3 of their bytes
//! done/ab/cdef…       fingerprint digest → output digest: "this stage result is complete"
//! items.db            per-item memo (SQLite, WAL): item key → the item's JSON result and its digest;
//!                     a compression dictionary per stage ([`dict`]); chunks of a stage's
//!                     consecutive results kept together ([`chunks`])
//! records/<pipeline>/<stage>.json   last fingerprint of each stage, to explain staleness
//! runs/<pipeline>.json              the last run: every iteration's stage outputs
//! tmp/                staging for atomic writes
//! lock                held by a running `pipeline run`
//! ```
//!
//! Every file write goes to `tmp/` and is renamed into place, so a killed process leaves either
//! the old file or the new one, never a torn one. Each item is its own SQLite transaction in
//! write-ahead-log mode, committed before the item is reported: a killed process loses no
//! committed item and leaves no partial one (the log's uncommitted tail is rolled back when the
//! store is next opened). One row per item instead of one file keeps a store of a million items a
//! few files, about the size of what it holds. Results are written before the `done` marker that
//! points at them. Reads verify: an object whose bytes do not hash to its name, or a memo entry
//! whose bytes do not hash to the digest stored beside them, is treated as absent and recomputed.
//!
//! A store written before the items moved into `items.db` (an `items/` directory of files) is
//! migrated when a run takes the store (or an item is first written): every file becomes a row,
//! in one transaction, then the directory is removed. Until then, commands that only read (`plan`,
//! `show`) read the files where they are.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::hash::{Digest, canonical_json};

mod dict;
pub mod chunks;

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

/// Objects are written compressed (Zstandard, fast level); the digest is of the JSON, not of the
/// file. An object written before (plain JSON) is read as it is: a frame's magic number tells them
/// apart, and JSON never starts with it.
const ZSTD_LEVEL: i32 = 1;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// An object file's JSON bytes.
pub(crate) fn read_object(path: &Path) -> io::Result<Vec<u8>> {
    let bytes = fs::read(path)?;
    if bytes.starts_with(&ZSTD_MAGIC) { zstd::stream::decode_all(&bytes[..]) } else { Ok(bytes) }
}

/// An object file's JSON bytes as they are read.
pub(crate) fn open_object(path: &Path) -> io::Result<Box<dyn io::Read + Send>> {
    use io::BufRead;
    let mut file = io::BufReader::with_capacity(1 << 16, File::open(path)?);
    if file.fill_buf()?.starts_with(&ZSTD_MAGIC) { Ok(Box::new(zstd::stream::Decoder::with_buffer(file)?)) } else { Ok(Box::new(file)) }
}

/// A writer that hands what it is given, a block at a time, to a thread that hashes it and writes
/// it compressed into a file.
struct Pipelined {
    block: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    worker: Option<std::thread::JoinHandle<io::Result<(File, Digest)>>>,
}

/// Blocks handed over, and how many may wait.
const PIPELINED_BLOCK: usize = 1 << 20;
const PIPELINED_WAITING: usize = 4;

impl Pipelined {
    fn new(file: File) -> io::Result<Pipelined> {
        let mut compressed = zstd::stream::Encoder::new(io::BufWriter::with_capacity(1 << 16, file), ZSTD_LEVEL)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(PIPELINED_WAITING);
        let worker = std::thread::Builder::new().name("object-writer".into()).spawn(move || {
            let mut hasher = blake3::Hasher::new();
            for block in rx {
                hasher.update(&block);
                compressed.write_all(&block)?;
            }
            let file = compressed.finish()?.into_inner().map_err(io::IntoInnerError::into_error)?;
            Ok((file, Digest(*hasher.finalize().as_bytes())))
        })?;
        Ok(Pipelined { block: Vec::with_capacity(PIPELINED_BLOCK), tx: Some(tx), worker: Some(worker) })
    }

    fn hand_over(&mut self) -> io::Result<()> {
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(PIPELINED_BLOCK));
        match self.tx.as_ref().map(|tx| tx.send(block)) {
            Some(Ok(())) => Ok(()),
            // The writer stopped at an error: it is what the write gets.
            _ => Err(self.join().err().unwrap_or_else(|| io::Error::other("the object writer stopped"))),
        }
    }

    fn join(&mut self) -> io::Result<(File, Digest)> {
        self.tx = None;
        match self.worker.take() {
            Some(worker) => worker.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
            None => Err(io::Error::other("the object writer stopped")),
        }
    }

    /// The file, all written, and the digest of what was written.
    fn finish(mut self) -> io::Result<(File, Digest)> {
        if !self.block.is_empty() {
            self.hand_over()?;
        }
        self.join()
    }
}

impl Write for Pipelined {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.block.extend_from_slice(buf);
        if self.block.len() >= PIPELINED_BLOCK {
            self.hand_over()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Pipelined {
    fn drop(&mut self) {
        // Not finished (a failure): the writer is stopped and waited for, its file left to the
        // caller to remove.
        if self.worker.is_some() {
            let _ = self.join();
        }
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
    /// The item database, opened on first use (shared by clones).
    items: Arc<OnceLock<Mutex<Option<rusqlite::Connection>>>>,
    /// The items' compression dictionaries (shared by clones).
    dicts: Arc<dict::Dicts>,
    /// The item log (`log.db`, [`Store::log_items`]), opened on first use (shared by clones).
    log: Arc<Mutex<Option<rusqlite::Connection>>>,
}

/// A SQLite failure as the I/O error it is (a full disk, a read-only one), so that it is reported
/// as the store's other failures are.
fn db_err(path: &Path) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |e| {
        let source = match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => io::Error::from_raw_os_error(28),
            Some(rusqlite::ErrorCode::ReadOnly) => io::Error::from_raw_os_error(30),
            Some(rusqlite::ErrorCode::PermissionDenied) => io::Error::from_raw_os_error(13),
            _ => io::Error::other(e.to_string()),
        };
        StoreError::Io { path: path.to_path_buf(), source }
    }
}

/// An emptied item log larger than this many pages is vacuumed.
const LOG_PAGES_KEPT: i64 = 256;
/// A write-ahead log is cut back to this size once checkpointed (a large transaction, such as
/// the item log sorted in, grows it for a while).
const WAL_BYTES_KEPT: i64 = 16 << 20;

/// The item log ([`Store::log_items`]): durable as the item table is (write-ahead log, no fsync
/// per commit), its rows in the order they were appended.
fn open_log(path: &Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    let db = rusqlite::Connection::open(path)?;
    db.busy_timeout(std::time::Duration::from_secs(30))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.pragma_update(None, "journal_size_limit", WAL_BYTES_KEPT)?;
    db.execute_batch("CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, key BLOB NOT NULL, digest BLOB NOT NULL, value BLOB NOT NULL)")?;
    Ok(db)
}

/// Writes encoded item rows (key, digest, stored bytes) with `insert`, then commits: all of them,
/// or none if a kill comes first.
fn commit_rows(tx: rusqlite::Transaction, insert: &str, rows: &[(Digest, Digest, Vec<u8>)], path: &Path) -> Result<(), StoreError> {
    for (key, digest, bytes) in rows {
        tx.prepare_cached(insert).and_then(|mut s| s.execute((&key.0[..], &digest.0[..], &bytes[..]))).map_err(db_err(path))?;
    }
    if crash_test::at_this_write() {
        // Written to the log, not committed, then die: what a kill mid-transaction leaves.
        std::process::abort();
    }
    tx.commit().map_err(db_err(path))
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
        Store { root: root.into(), items: Default::default(), dicts: Default::default(), log: Default::default() }
    }

    fn items_path(&self) -> PathBuf {
        self.root.join("items.db")
    }

    /// The item database, opened (`create`: created, an old `items/` directory migrated) on first
    /// use; `None` when there is none yet and `create` is false. A database that cannot be opened
    /// for reading reads as empty: its items are recomputed.
    fn with_items<T>(&self, create: bool, f: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>) -> Result<Option<T>, StoreError> {
        let cell = self.items.get_or_init(|| Mutex::new(None));
        let mut guard = cell.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            let path = self.items_path();
            if !create && !path.is_file() {
                return Ok(None);
            }
            if create {
                fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
            }
            let open = || -> Result<rusqlite::Connection, rusqlite::Error> {
                let db = rusqlite::Connection::open(&path)?;
                db.busy_timeout(std::time::Duration::from_secs(30))?;
                // Durable across a killed process (the log is written before a commit returns); an
                // fsync at each checkpoint, not at each item.
                db.pragma_update(None, "journal_mode", "WAL")?;
                db.pragma_update(None, "synchronous", "NORMAL")?;
                db.pragma_update(None, "journal_size_limit", WAL_BYTES_KEPT)?;
                db.execute_batch("CREATE TABLE IF NOT EXISTS items (key BLOB PRIMARY KEY, digest BLOB NOT NULL, value BLOB NOT NULL) WITHOUT ROWID")?;
                db.execute_batch(dict::SCHEMA)?;
                db.execute_batch(chunks::SCHEMA)?;
                Ok(db)
            };
            let db = open().map_err(db_err(&path))?;
            if create {
                self.migrate_item_files(&db)?;
            }
            *guard = Some(db);
        }
        f(guard.as_ref().expect("opened")).map(Some)
    }

    /// Moves the files of an `items/` directory (the store's earlier layout) into the database.
    fn migrate_item_files(&self, db: &rusqlite::Connection) -> Result<(), StoreError> {
        let dir = self.root.join("items");
        if !dir.is_dir() {
            return Ok(());
        }
        let path = self.items_path();
        let tx = db.unchecked_transaction().map_err(db_err(&path))?;
        let mut moved = 0usize;
        for shard in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            for file in fs::read_dir(shard.path()).map_err(io_err(&dir))?.flatten() {
                let name = format!("{}{}", shard.file_name().to_string_lossy(), file.file_name().to_string_lossy());
                let (Ok(key), Ok(bytes)) = (name.parse::<Digest>(), fs::read(file.path())) else { continue };
                // A file that does not parse was never a finished item.
                if serde_json::from_slice::<Value>(&bytes).is_err() {
                    continue;
                }
                tx.execute("INSERT OR IGNORE INTO items (key, digest, value) VALUES (?1, ?2, ?3)", (&key.0[..], &Digest::of_bytes(&bytes).0[..], &bytes)).map_err(db_err(&path))?;
                moved += 1;
            }
        }
        tx.commit().map_err(db_err(&path))?;
        // Moved: the files go (a kill meanwhile leaves some, moved again next time, harmlessly).
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        tracing::info!(items = moved, store = %self.root.display(), "moved the store's item files into items.db");
        Ok(())
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
            Ok(()) => {
                // Held: a store in the earlier layout is migrated now, before anything is read,
                // and items a killed run left in the log are sorted into the item table.
                if self.root.join("items").is_dir() {
                    self.with_items(true, |_| Ok(()))?;
                }
                self.settle_items()?;
                Ok(StoreLock { file })
            }
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
            let compressed = zstd::stream::encode_all(&bytes[..], ZSTD_LEVEL).map_err(io_err(&path))?;
            self.write_atomic(&path, &compressed)?;
        }
        Ok(digest)
    }

    /// Stores an artifact that `fill` writes as it is assembled (its canonical JSON bytes: see
    /// [`crate::stream::OutputWriter`]), hashed as it is written; returns its digest. `fill`
    /// returns whether to keep what it wrote (false: the stage failed, nothing is stored). Staged
    /// in `tmp/` and renamed into place, like every other write: a kill leaves no object.
    pub fn put_object_streamed(&self, fill: impl FnOnce(&mut dyn Write) -> io::Result<bool>) -> Result<Option<Digest>, StoreError> {
        let staging = self.root.join("tmp");
        fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        let tmp = crate::atomic::staged(&staging, "object");
        let result = (|| {
            let file = File::create(&tmp)?;
            // Hashed, compressed and written by a thread of its own while `fill` assembles the
            // next block: a large output costs its assembly, not that plus its compression.
            let mut out = Pipelined::new(file)?;
            if !fill(&mut out)? {
                return Ok(None);
            }
            let (file, digest) = out.finish()?;
            if crash_test::at_this_write() {
                // Half the bytes, then die: the torn write a kill can leave.
                file.set_len(file.metadata()?.len() / 2)?;
                std::process::abort();
            }
            file.sync_all()?;
            let path = self.sharded("objects", &digest);
            if path.is_file() {
                fs::remove_file(&tmp)?;
            } else {
                crate::atomic::commit(&tmp, &path)?;
            }
            Ok(Some(digest))
        })();
        if !matches!(result, Ok(Some(_))) {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err(&tmp))
    }

    /// Where an object is (it may not be there).
    pub(crate) fn object_path(&self, digest: &Digest) -> PathBuf {
        self.sharded("objects", digest)
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
        let bytes = read_object(&self.sharded("objects", digest)).ok()?;
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

    /// The full output whose stable digest (volatile keys left out, as a lockfile pins it) is
    /// `stable`, from any finished stage's marker: a lockfile's output found in the store. A
    /// scan of the markers, for commands that read one output, not for runs.
    pub fn find_by_stable(&self, stable: &Digest) -> Option<Digest> {
        if self.has_object(stable) {
            return Some(*stable);
        }
        let shards = fs::read_dir(self.root.join("done")).ok()?;
        shards.flatten().flat_map(|shard| fs::read_dir(shard.path()).into_iter().flatten().flatten()).find_map(|marker| {
            let text = fs::read_to_string(marker.path()).ok()?;
            let mut lines = text.lines();
            let full: Digest = lines.next()?.parse().ok()?;
            let this: Digest = lines.next()?.parse().ok()?;
            (this == *stable && self.has_object(&full)).then_some(full)
        })
    }

    pub fn put_done(&self, fingerprint: &Digest, output: &Outputs) -> Result<(), StoreError> {
        self.write_atomic(&self.sharded("done", fingerprint), format!("{}\n{}\n", output.full, output.stable).as_bytes())
    }

    /// An item's memoized result, verified against the digest stored with it. `None` if absent
    /// or damaged.
    pub fn get_item(&self, key: &Digest) -> Option<Value> {
        let row = self.with_items(false, |db| {
            let mut statement = db.prepare_cached("SELECT digest, value FROM items WHERE key = ?1").map_err(db_err(&self.items_path()))?;
            let found = statement.query_row([&key.0[..]], |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?)));
            Ok(found.ok().map(|(digest, stored)| self.read_row(db, key, digest, stored)))
        });
        match row.ok().flatten().flatten() {
            Some(value) => value,
            None => self.get_item_file(key),
        }
    }

    /// A row's value, verified against its digest (of the stored bytes) and decompressed.
    fn read_row(&self, db: &rusqlite::Connection, key: &Digest, digest: Vec<u8>, stored: Vec<u8>) -> Option<Value> {
        serde_json::from_slice(&self.read_row_bytes(db, key, digest, stored)?).ok()
    }

    /// A row's value as the canonical JSON it was kept as: verified against its digest and
    /// decompressed, not parsed.
    fn read_row_bytes(&self, db: &rusqlite::Connection, key: &Digest, digest: Vec<u8>, stored: Vec<u8>) -> Option<Vec<u8>> {
        let bytes = (digest == Digest::of_bytes(&stored).0).then(|| self.dicts.decode(db, stored)).flatten();
        if bytes.is_none() {
            tracing::warn!(item = %key, "damaged item in store; it will be recomputed");
        }
        bytes
    }

    /// Item lookups for a pass over many items (a stage's listing, its output written from its
    /// items): one read transaction on a connection of their own, not a lock per lookup. It sees
    /// the items committed when it was made.
    pub fn item_reader(&self) -> ItemReader<'_> {
        let path = self.items_path();
        let open = || -> Result<rusqlite::Connection, rusqlite::Error> {
            let db = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
            db.busy_timeout(std::time::Duration::from_secs(30))?;
            db.pragma_update(None, "cache_size", -8192)?;
            db.execute_batch("BEGIN")?;
            Ok(db)
        };
        ItemReader { store: self, db: if path.is_file() { open().ok() } else { None } }
    }

    /// Whether an item's result is memoized and intact (verified against its digest, as a read
    /// would, without parsing it).
    pub fn has_item(&self, key: &Digest) -> bool {
        let found = self.with_items(false, |db| {
            let mut statement = db.prepare_cached("SELECT digest, value FROM items WHERE key = ?1").map_err(db_err(&self.items_path()))?;
            let intact = statement.query_row([&key.0[..]], |row| {
                let stored = row.get_ref(1)?.as_blob()?;
                Ok(row.get_ref(0)?.as_blob()? == Digest::of_bytes(stored).0 && self.dicts.readable(db, stored))
            });
            Ok(intact.unwrap_or(false))
        });
        found.ok().flatten().unwrap_or(false) || self.sharded("items", key).is_file()
    }

    /// An item in the earlier layout's `items/` directory, not yet migrated (read by commands that
    /// do not write, such as `plan` and `show`).
    fn get_item_file(&self, key: &Digest) -> Option<Value> {
        serde_json::from_slice(&fs::read(self.sharded("items", key)).ok()?).ok()
    }

    /// Memoizes an item's result: committed when this returns. `family` names the items that
    /// are alike (a stage's): they share a compression dictionary.
    pub fn put_item(&self, family: &str, key: &Digest, value: &Value) -> Result<(), StoreError> {
        self.put_items(family, &[(key, &canonical_json(value))])
    }

    /// Memoizes items' results (each as its canonical JSON) in one transaction: all committed
    /// when this returns, none if a kill comes first (items that finish together cost one
    /// commit, not one each).
    pub fn put_items(&self, family: &str, items: &[(&Digest, &[u8])]) -> Result<(), StoreError> {
        let path = self.items_path();
        self.with_items(true, |db| {
            let tx = db.unchecked_transaction().map_err(db_err(&path))?;
            let (rows, new_dict) = self.encode_items(&tx, family, items)?;
            commit_rows(tx, "INSERT OR REPLACE INTO items (key, digest, value) VALUES (?1, ?2, ?3)", &rows, &path)?;
            if let Some(id) = new_dict {
                self.dicts.stored(family, id);
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Items' values as the item table keeps them: key, digest of the stored bytes, the bytes
    /// (compressed with the family's dictionary once it has one). A dictionary trained meanwhile
    /// is written to `db` (in its transaction, if one is open): it goes in with the first value
    /// that needs it; its id is returned, to be marked stored once that is committed.
    fn encode_items(&self, db: &rusqlite::Connection, family: &str, items: &[(&Digest, &[u8])]) -> Result<(Vec<(Digest, Digest, Vec<u8>)>, Option<std::num::NonZeroU32>), StoreError> {
        let path = self.items_path();
        let mut new_dict = None;
        let mut rows = Vec::with_capacity(items.len());
        for &(key, json) in items {
            let mut encoded = self.dicts.encode(db, family, json);
            if let Some((id, dict)) = encoded.new_dict.take()
                && new_dict != Some(id)
            {
                // Ids are random: one taken by another dictionary leaves this family plain.
                let taken: Option<Vec<u8>> = db.query_row("SELECT digest FROM dicts WHERE id = ?1", [id.get()], |row| row.get(0)).ok();
                if taken.is_some_and(|d| d != Digest::of_bytes(&dict).0) {
                    self.dicts.refuse(family);
                    encoded.bytes = json[..].into();
                } else {
                    db.execute("INSERT OR IGNORE INTO dicts (id, family, digest, dict) VALUES (?1, ?2, ?3, ?4)", (id.get(), family, &Digest::of_bytes(&dict).0[..], &dict))
                        .map_err(db_err(&path))?;
                    new_dict = Some(id);
                }
            }
            let bytes = encoded.bytes.into_owned();
            rows.push((*key, Digest::of_bytes(&bytes), bytes));
        }
        Ok((rows, new_dict))
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("log.db")
    }

    /// Memoizes items' results as [`Store::put_items`] does (all committed when this returns,
    /// none if a kill comes first), appended to the item log (`log.db`) in the order they
    /// finish instead of each put into its place in the item table, which is ordered by key.
    /// Keys are digests: a million items finishing in random key order each land in a page of
    /// their own there, each page written twice (write-ahead log, checkpoint) and read back once
    /// it left the cache: about 40 KB of I/O per 100-byte item. The log is written a page at a
    /// time, and [`Store::settle_items`] sorts it into the table in one pass. Until then,
    /// lookups do not see what it holds.
    pub fn log_items(&self, family: &str, items: &[(&Digest, &[u8])]) -> Result<(), StoreError> {
        // A dictionary trained meanwhile is committed first, alone: a kill after it leaves a
        // dictionary no value needs yet, which the next run takes up.
        let rows = self.with_items(true, |db| {
            let (rows, new_dict) = self.encode_items(db, family, items)?;
            if let Some(id) = new_dict {
                self.dicts.stored(family, id);
            }
            Ok(rows)
        })?
        .unwrap_or_default();
        let path = self.log_path();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.is_none() {
            *log = Some(open_log(&path).map_err(db_err(&path))?);
        }
        let db = log.as_ref().expect("opened");
        let tx = db.unchecked_transaction().map_err(db_err(&path))?;
        commit_rows(tx, "INSERT INTO log (key, digest, value) VALUES (?1, ?2, ?3)", &rows, &path)
    }

    /// Sorts the items in the log ([`Store::log_items`]) into the item table in one transaction,
    /// then empties the log. A kill before the table's commit leaves both as they were; one
    /// after it leaves the log to be sorted in again, which changes nothing. A store's log is
    /// settled when the store is taken ([`Store::lock`]): what a killed run left is found.
    pub fn settle_items(&self) -> Result<(), StoreError> {
        let path = self.log_path();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.is_none() {
            if !path.is_file() {
                return Ok(());
            }
            *log = Some(open_log(&path).map_err(db_err(&path))?);
        }
        let db = log.as_ref().expect("opened");
        let empty: bool = db.query_row("SELECT NOT EXISTS (SELECT 1 FROM log)", [], |row| row.get(0)).map_err(db_err(&path))?;
        if empty {
            return Ok(());
        }
        let items_path = self.items_path();
        let started = std::time::Instant::now();
        let sorted = self.with_items(true, |items| {
            items.execute("ATTACH DATABASE ?1 AS log", [path.to_string_lossy()]).map_err(db_err(&path))?;
            let sorted = (|| {
                let tx = items.unchecked_transaction()?;
                let n = tx.execute("INSERT OR REPLACE INTO main.items (key, digest, value) SELECT key, digest, value FROM log.log ORDER BY key", [])?;
                if crash_test::at_this_write() {
                    std::process::abort();
                }
                tx.commit()?;
                Ok(n)
            })();
            let _ = items.execute("DETACH DATABASE log", []);
            sorted.map_err(db_err(&items_path))
        })?;
        db.execute("DELETE FROM log", []).map_err(db_err(&path))?;
        // Its pages given back: the log holds at most one stage's items at a time.
        let pages: i64 = db.query_row("PRAGMA page_count", [], |row| row.get(0)).map_err(db_err(&path))?;
        if pages > LOG_PAGES_KEPT {
            db.execute_batch("VACUUM").map_err(db_err(&path))?;
        }
        tracing::debug!(items = sorted, seconds = started.elapsed().as_secs_f64(), "sorted the item log into the item table");
        Ok(())
    }

    /// Keeps a chunk of items' results ([`chunks`]) under `key`, committed when this returns.
    pub fn put_chunk(&self, key: &Digest, results: &[Vec<u8>]) -> Result<(), StoreError> {
        let path = self.items_path();
        let stored = chunks::encode(results).map_err(io_err(&path))?;
        self.with_items(true, |db| {
            db.prepare_cached("INSERT OR REPLACE INTO chunks (key, digest, value) VALUES (?1, ?2, ?3)")
                .and_then(|mut s| s.execute((&key.0[..], &Digest::of_bytes(&stored).0[..], &stored[..])))
                .map_err(db_err(&path))
        })?;
        Ok(())
    }

    /// Keeps records a stage derived ([`crate::StageInput::kept`]) under `key`, committed when
    /// this returns; stored as a chunk is, beside the chunks.
    pub fn put_kept(&self, key: &Digest, records: &[Vec<u8>]) -> Result<(), StoreError> {
        self.put_chunk(&chunks::kept_key(key), records)
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

/// See [`Store::item_reader`].
pub struct ItemReader<'s> {
    store: &'s Store,
    /// `None`: no database yet (or it cannot be read): the earlier layout's files are looked at.
    db: Option<rusqlite::Connection>,
}

impl ItemReader<'_> {
    /// The item's stored digest and bytes.
    fn row(&self, key: &Digest) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut statement = self.db.as_ref()?.prepare_cached("SELECT digest, value FROM items WHERE key = ?1").ok()?;
        statement.query_row([&key.0[..]], |row| Ok((row.get(0)?, row.get(1)?))).ok()
    }

    /// A chunk's stored bytes, if they are intact (a store from before chunks has none).
    fn chunk_row(&self, key: &Digest) -> Option<Vec<u8>> {
        let mut statement = self.db.as_ref()?.prepare_cached("SELECT digest, value FROM chunks WHERE key = ?1").ok()?;
        let (digest, stored): (Vec<u8>, Vec<u8>) = statement.query_row([&key.0[..]], |row| Ok((row.get(0)?, row.get(1)?))).ok()?;
        if digest == Digest::of_bytes(&stored).0 {
            Some(stored)
        } else {
            tracing::warn!(chunk = %key, "damaged chunk in store; what it held is read or computed again");
            None
        }
    }

    /// Whether the chunk `key` is kept, intact: all its items' results are.
    pub fn has_chunk(&self, key: &Digest) -> bool {
        self.chunk_row(key).is_some()
    }

    /// The `n` results of the chunk `key`, in order, as kept (canonical JSON).
    pub fn get_chunk(&self, key: &Digest, n: usize) -> Option<Vec<Vec<u8>>> {
        chunks::decode(&self.chunk_row(key)?, Some(n))
    }

    /// The records a stage kept under `key` ([`Store::put_kept`]), if they are intact.
    pub fn get_kept(&self, key: &Digest) -> Option<Vec<Vec<u8>>> {
        chunks::decode(&self.chunk_row(&chunks::kept_key(key))?, None)
    }

    /// As [`Store::has_item`].
    pub fn has(&self, key: &Digest) -> bool {
        match (self.row(key), &self.db) {
            (Some((digest, stored)), Some(db)) => digest == Digest::of_bytes(&stored).0 && self.store.dicts.readable(db, &stored),
            _ => self.db.is_none() && self.store.has_item(key),
        }
    }

    /// As [`Store::get_item`].
    pub fn get(&self, key: &Digest) -> Option<Value> {
        serde_json::from_slice(&self.get_canonical(key)?).ok()
    }

    /// As [`Self::get`], the value's canonical JSON bytes (as kept, not parsed).
    pub fn get_canonical(&self, key: &Digest) -> Option<Vec<u8>> {
        match (self.row(key), &self.db) {
            (Some((digest, stored)), Some(db)) => self.store.read_row_bytes(db, key, digest, stored),
            _ if self.db.is_none() => self.store.get_item(key).map(|value| canonical_json(&value)),
            _ => None,
        }
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
    fn objects_are_stored_compressed_and_plain_ones_from_before_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let value = json!({"samples": vec!["the same text again"; 1000]});
        let d = store.put_object(&value).unwrap();
        let on_disk = fs::read(store.sharded("objects", &d)).unwrap();
        assert!(on_disk.starts_with(&ZSTD_MAGIC) && on_disk.len() < canonical_json(&value).len() / 10, "{} bytes", on_disk.len());
        assert_eq!(d, Digest::of_json(&value), "named by the JSON, not by the file");
        assert_eq!(store.get_object(&d), Some(value));
        let plain = json!({"written": "before"});
        let p = Digest::of_json(&plain);
        store.write_atomic(&store.sharded("objects", &p), &canonical_json(&plain)).unwrap();
        assert_eq!(store.get_object(&p), Some(plain));
    }

    #[test]
    fn an_output_is_found_by_its_stable_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let full = store.put_object(&json!({"n": 1, "timing": 3})).unwrap();
        let stable = Digest::of_json(&json!({"n": 1}));
        assert_eq!(store.find_by_stable(&stable), None);
        store.put_done(&Digest::of_bytes(b"fp"), &Outputs { full, stable }).unwrap();
        assert_eq!(store.find_by_stable(&stable), Some(full));
        assert_eq!(store.find_by_stable(&full), Some(full), "an output without volatile keys is its own");
    }

    #[test]
    fn items_are_verified_on_read_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let key = Digest::of_bytes(b"item");
        assert!(!store.has_item(&key) && store.get_item(&key).is_none());
        assert!(!dir.path().join("items.db").exists(), "reading creates nothing");
        store.put_item("test", &key, &json!({"answer": "a"})).unwrap();
        assert_eq!(Store::new(dir.path()).get_item(&key), Some(json!({"answer": "a"})), "committed: another connection sees it");
        // Damage the value behind its digest: it reads as absent.
        let db = rusqlite::Connection::open(dir.path().join("items.db")).unwrap();
        db.execute("UPDATE items SET value = ?1", [&b"{\"answer\":\"b\"}"[..]]).unwrap();
        assert_eq!(Store::new(dir.path()).get_item(&key), None);
        assert!(!Store::new(dir.path()).has_item(&key), "a damaged item is not counted as cached: it is recomputed");
    }

    /// A stage's values like the ones of a rendered prompt: the same keys and text around what
    /// differs.
    fn alike(n: usize) -> Value {
        json!({"id": format!("sample-{n}"), "prompt": format!("Read the sample and answer with one word.\n\nSample {n}: the value {} is {}.", n * 7919 % 10007, ["low", "mid", "high"][n % 3]), "max_tokens": 8})
    }

    #[test]
    fn a_family_of_items_is_compressed_with_a_dictionary_it_trained_and_reads_back_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let keys: Vec<Digest> = (0..6000).map(|n| Digest::of_bytes(format!("k{n}").as_bytes())).collect();
        let values: Vec<Value> = (0..6000).map(alike).collect();
        let json: Vec<Vec<u8>> = values.iter().map(canonical_json).collect();
        for chunk in (0..4000).collect::<Vec<_>>().chunks(256) {
            store.put_items("p/render", &chunk.iter().map(|&n| (&keys[n], &json[n][..])).collect::<Vec<_>>()).unwrap();
        }
        let db = rusqlite::Connection::open(dir.path().join("items.db")).unwrap();
        let stored = |n: usize| db.query_row("SELECT value FROM items WHERE key = ?1", [&keys[n].0[..]], |r| r.get::<_, Vec<u8>>(0)).unwrap();
        assert_eq!(db.query_row("SELECT count(*) FROM dicts WHERE family = 'p/render'", [], |r| r.get::<_, i64>(0)).unwrap(), 1);
        assert_eq!(stored(0), canonical_json(&values[0]), "the values it learns from stay plain");
        let (plain, compressed) = (canonical_json(&values[3999]).len(), stored(3999).len());
        assert!(stored(3999).starts_with(&ZSTD_MAGIC) && compressed * 3 < plain, "{plain} bytes stored as {compressed}");
        // Another run (a new process) uses the same dictionary, and reads everything back.
        let again = Store::new(dir.path());
        again.put_items("p/render", &(4000..6000).map(|n| (&keys[n], &json[n][..])).collect::<Vec<_>>()).unwrap();
        assert_eq!(db.query_row("SELECT count(*) FROM dicts", [], |r| r.get::<_, i64>(0)).unwrap(), 1);
        assert!(stored(5999).starts_with(&ZSTD_MAGIC));
        let fresh = Store::new(dir.path());
        let reader = fresh.item_reader();
        for n in [0, 1999, 2000, 3999, 4000, 5999] {
            assert!(fresh.has_item(&keys[n]) && reader.has(&keys[n]), "item {n}");
            assert_eq!(fresh.get_item(&keys[n]).as_ref(), Some(&values[n]), "item {n}");
            assert_eq!(reader.get(&keys[n]).as_ref(), Some(&values[n]), "item {n}");
        }
        // A damaged dictionary: the items compressed with it read as absent (recomputed), the
        // plain ones as they are.
        drop(reader);
        db.execute("UPDATE dicts SET dict = substr(dict, 1, length(dict) - 1) || x'00'", []).unwrap();
        let damaged = Store::new(dir.path());
        assert!(damaged.has_item(&keys[0]) && !damaged.has_item(&keys[5999]) && !damaged.item_reader().has(&keys[5999]));
        assert_eq!(damaged.get_item(&keys[5999]), None);
        assert_eq!(damaged.item_reader().get(&keys[0]).as_ref(), Some(&values[0]));
    }

    #[test]
    fn logged_items_are_sorted_into_the_table_when_settled_or_when_the_store_is_next_taken() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let keys: Vec<Digest> = (0..5000).map(|n| Digest::of_bytes(format!("k{n}").as_bytes())).collect();
        let values: Vec<Value> = (0..5000).map(alike).collect();
        let json: Vec<Vec<u8>> = values.iter().map(canonical_json).collect();
        store.put_item("p/render", &keys[0], &values[0]).unwrap();
        for chunk in (1..3000).collect::<Vec<_>>().chunks(256) {
            store.log_items("p/render", &chunk.iter().map(|&n| (&keys[n], &json[n][..])).collect::<Vec<_>>()).unwrap();
        }
        assert!(!store.has_item(&keys[1]), "logged, not yet sorted in");
        store.settle_items().unwrap();
        let log = rusqlite::Connection::open(dir.path().join("log.db")).unwrap();
        assert_eq!(log.query_row("SELECT count(*) FROM log", [], |r| r.get::<_, i64>(0)).unwrap(), 0, "the log is emptied");
        for n in [0, 1, 1999, 2999] {
            assert_eq!(store.get_item(&keys[n]).as_ref(), Some(&values[n]), "item {n}");
        }
        // A dictionary trained on logged values is in the table, and the values after it use it.
        let db = rusqlite::Connection::open(dir.path().join("items.db")).unwrap();
        assert_eq!(db.query_row("SELECT count(*) FROM dicts", [], |r| r.get::<_, i64>(0)).unwrap(), 1);
        let stored = db.query_row("SELECT value FROM items WHERE key = ?1", [&keys[2999].0[..]], |r| r.get::<_, Vec<u8>>(0)).unwrap();
        assert!(stored.starts_with(&ZSTD_MAGIC));
        // Logged by a run that is then killed (never settled): the next one to take the store
        // sorts them in before anything is read.
        store.log_items("p/render", &(3000..5000).map(|n| (&keys[n], &json[n][..])).collect::<Vec<_>>()).unwrap();
        drop(store);
        let next = Store::new(dir.path());
        assert!(!next.has_item(&keys[4999]));
        let lock = next.lock().unwrap();
        let reader = next.item_reader();
        assert!((0..5000).all(|n| reader.has(&keys[n])), "every item, logged or put, is found");
        assert_eq!(reader.get(&keys[4999]).as_ref(), Some(&values[4999]));
        drop((reader, lock));
        // Sorted in again (a kill between the table's commit and the log's emptying): the same.
        next.log_items("p/render", &[(&keys[7], &json[7][..])]).unwrap();
        next.settle_items().unwrap();
        next.log_items("p/render", &[(&keys[7], &json[7][..])]).unwrap();
        next.settle_items().unwrap();
        assert_eq!(db.query_row("SELECT count(*) FROM items", [], |r| r.get::<_, i64>(0)).unwrap(), 5000);
        assert_eq!(next.get_item(&keys[7]).as_ref(), Some(&values[7]));
    }

    #[test]
    fn an_item_directory_is_migrated_when_the_store_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let (a, b) = (Digest::of_bytes(b"a"), Digest::of_bytes(b"b"));
        // The earlier layout: one file per item, and a torn one that never finished.
        store.write_atomic(&store.sharded("items", &a), &canonical_json(&json!({"n": 1}))).unwrap();
        store.write_atomic(&store.sharded("items", &b), b"{\"n\":").unwrap();
        assert_eq!(store.get_item(&a), Some(json!({"n": 1})), "read in place before migration");
        let lock = Store::new(dir.path()).lock().unwrap();
        assert!(!dir.path().join("items").exists());
        let reopened = Store::new(dir.path());
        assert_eq!(reopened.get_item(&a), Some(json!({"n": 1})));
        assert!(!reopened.has_item(&b));
        drop(lock);
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
