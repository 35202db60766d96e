//! Artifacts too large to hold: read one element at a time from the store, and written as they
//! are assembled.
//!
//! An artifact is still one canonical JSON object, named by the BLAKE3 of its bytes (the same
//! bytes and digest as if it had been built whole: lockfiles do not see the difference). A stage
//! that opts in ([`crate::Stage::streams_output`]) writes its output through an [`OutputWriter`],
//! field by field in canonical key order, one array element at a time; a stage reading a large
//! input visits the elements of one of its arrays with [`crate::StageInput::each`]. Memory then
//! follows one element, not the artifact.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::hash::{Digest, write_canonical};
use crate::stage::StageError;

/// A stage's output, written as canonical JSON while it is assembled: an object whose keys come
/// in code-point order (as canonical JSON sorts them), each value written whole
/// ([`Self::field`]) or as an array one element at a time ([`Self::elements`]).
pub struct OutputWriter<'a> {
    out: &'a mut dyn Write,
    last_key: Option<String>,
    buf: Vec<u8>,
    /// For a stage whose output holds its items' results ([`crate::Stage::output_holds_results`]):
    /// each one's canonical JSON, in item order, read from the store.
    results: Option<&'a mut dyn Iterator<Item = Result<Vec<u8>, StageError>>>,
    /// The first write that failed (a full disk): the store reports it once the stage returns.
    pub(crate) failed: Option<io::Error>,
}

impl<'a> OutputWriter<'a> {
    pub(crate) fn new(out: &'a mut dyn Write) -> Self {
        OutputWriter { out, last_key: None, buf: Vec::with_capacity(4096), results: None, failed: None }
    }

    pub(crate) fn with_results(out: &'a mut dyn Write, results: &'a mut dyn Iterator<Item = Result<Vec<u8>, StageError>>) -> Self {
        OutputWriter { results: Some(results), ..OutputWriter::new(out) }
    }

    fn key(&mut self, key: &str) {
        assert!(self.last_key.as_deref().is_none_or(|last| last < key), "output keys must come in canonical (code point) order: `{key}` after `{:?}`", self.last_key);
        self.buf.push(if self.last_key.is_none() { b'{' } else { b',' });
        serde_json::to_writer(&mut self.buf, key).expect("writing to a Vec cannot fail");
        self.buf.push(b':');
        self.last_key = Some(key.to_string());
    }

    fn flush_buf(&mut self) -> Result<(), StageError> {
        if self.failed.is_none()
            && let Err(e) = self.out.write_all(&self.buf)
        {
            self.failed = Some(e);
        }
        self.buf.clear();
        match &self.failed {
            Some(e) => Err(StageError::new(format!("writing the output: {e}"))),
            None => Ok(()),
        }
    }

    /// `key` and its whole value.
    pub fn field(&mut self, key: &str, value: &impl Serialize) -> Result<(), StageError> {
        self.key(key);
        write_canonical(&serde_json::to_value(value).map_err(|e| StageError::new(format!("`{key}` does not serialize: {e}")))?, &mut self.buf);
        self.flush_buf()
    }

    /// `key` and an array of `elements`, each written as it comes.
    pub fn elements<T: Serialize>(&mut self, key: &str, elements: impl IntoIterator<Item = Result<T, StageError>>) -> Result<(), StageError> {
        self.key(key);
        self.buf.push(b'[');
        for (i, element) in elements.into_iter().enumerate() {
            if i > 0 {
                self.buf.push(b',');
            }
            let value = serde_json::to_value(element?).map_err(|e| StageError::new(format!("an element of `{key}` does not serialize: {e}")))?;
            write_canonical(&value, &mut self.buf);
            if self.buf.len() >= 1 << 16 {
                self.flush_buf()?;
            }
        }
        self.buf.push(b']');
        self.flush_buf()
    }

    /// `key` and an array of the items' results, as memoized, in item order: for a stage whose
    /// output holds them ([`crate::Stage::output_holds_results`]). Their canonical bytes are copied
    /// as the store keeps them.
    pub fn item_values(&mut self, key: &str) -> Result<(), StageError> {
        let Some(results) = self.results.take() else {
            return Err(StageError::new("the items' results are written as they are only for a stage whose output holds them"));
        };
        self.canonical_elements(key, results)
    }

    /// `key` and an array of elements given as their canonical JSON (as
    /// [`crate::hash::canonical_json`] writes it: bytes the stage made so, or kept so), copied as
    /// they are.
    pub fn canonical_elements(&mut self, key: &str, elements: impl IntoIterator<Item = Result<Vec<u8>, StageError>>) -> Result<(), StageError> {
        self.key(key);
        self.buf.push(b'[');
        for (i, element) in elements.into_iter().enumerate() {
            if i > 0 {
                self.buf.push(b',');
            }
            self.buf.extend_from_slice(&element?);
            if self.buf.len() >= 1 << 16 {
                self.flush_buf()?;
            }
        }
        self.buf.push(b']');
        self.flush_buf()
    }

    /// Whether [`Self::item_values`] wrote the results it was given.
    pub(crate) fn results_written(&self) -> bool {
        self.results.is_none()
    }

    pub(crate) fn finish(mut self) -> Result<(), io::Error> {
        self.buf.extend_from_slice(if self.last_key.is_none() { b"{}" } else { b"}" });
        let _ = self.flush_buf();
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// What a stage that streams its output ([`crate::Stage::streams_output`]) writes, as bytes: for
/// its own tests (a run writes them into the store, results and all).
pub fn streamed_output(stage: &dyn crate::Stage, input: &crate::StageInput) -> Result<Vec<u8>, StageError> {
    let mut bytes = Vec::new();
    let mut out = OutputWriter::new(&mut bytes);
    stage.write_output(input, &mut std::iter::empty(), &mut out)?;
    out.finish().map_err(|e| StageError::new(format!("writing the output: {e}")))?;
    Ok(bytes)
}

/// A file's bytes read from its path when first asked for, checked against the digest taken
/// when the run started (a large file is not held for the whole run).
pub(crate) struct Lazy {
    pub(crate) path: PathBuf,
    pub(crate) digest: Digest,
    pub(crate) what: String,
    value: OnceLock<Result<Arc<[u8]>, StageError>>,
}

impl Lazy {
    pub(crate) fn new(path: PathBuf, digest: Digest, what: String) -> Self {
        Lazy { path, digest, what, value: OnceLock::new() }
    }

    pub(crate) fn bytes(&self) -> Result<&[u8], StageError> {
        let got = self.value.get_or_init(|| {
            let bytes = std::fs::read(&self.path).map_err(|e| StageError::new(format!("cannot read {}: {e}", self.what)))?;
            if Digest::of_bytes(&bytes) != self.digest {
                return Err(StageError::new(format!("{} changed while the pipeline ran; run it again", self.what)));
            }
            Ok(Arc::from(bytes))
        });
        got.as_deref().map_err(Clone::clone)
    }
}

impl Lazy {
    /// The file read from its start, verified when read to its end (read and hashed ahead of
    /// the caller, on a thread of its own: [`ReadAhead`]).
    pub(crate) fn reader(&self) -> Result<Box<dyn Read + Send + '_>, StageError> {
        let file = File::open(&self.path).map_err(|e| StageError::new(format!("cannot read {}: {e}", self.what)))?;
        Ok(Box::new(ReadAhead::new(Verifying::new(file, self.digest, format!("{} changed while the pipeline ran; run it again", self.what)))))
    }
}

/// A reader that hashes what it reads and, at its end, fails (`InvalidData`, with `failure`)
/// unless it read the bytes digested: what was read before then is the caller's to discard.
struct Verifying<R> {
    inner: R,
    hasher: blake3::Hasher,
    digest: Digest,
    failure: String,
    done: bool,
}

impl<R: Read> Verifying<R> {
    fn new(inner: R, digest: Digest, failure: String) -> Self {
        Verifying { inner, hasher: blake3::Hasher::new(), digest, failure, done: false }
    }
}

impl<R: Read> Read for Verifying<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if n == 0 && !buf.is_empty() && !self.done {
            if Digest(*self.hasher.finalize().as_bytes()) != self.digest {
                return Err(io::Error::new(io::ErrorKind::InvalidData, self.failure.clone()));
            }
            self.done = true;
        }
        Ok(n)
    }
}

/// A reader whose source is read on a thread of its own, a few blocks ahead: reading, unpacking
/// and hashing a large artifact take the second core while the caller parses what came before.
/// The source's end and its errors reach the caller in order, after every byte read before
/// them; an error stays (each read after it fails again). Dropped early, it stops the thread at
/// its next block.
pub(crate) struct ReadAhead {
    blocks: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    block: Vec<u8>,
    at: usize,
    /// The end, or the error that ended the source (its kind and message).
    ended: Option<Option<(io::ErrorKind, String)>>,
}

impl ReadAhead {
    const BLOCK: usize = 1 << 18;

    pub(crate) fn new(mut source: impl Read + Send + 'static) -> ReadAhead {
        let (send, blocks) = std::sync::mpsc::sync_channel(4);
        std::thread::Builder::new()
            .name("read-ahead".into())
            .spawn(move || {
                loop {
                    let mut block = vec![0; Self::BLOCK];
                    let mut filled = 0;
                    let read = loop {
                        match source.read(&mut block[filled..]) {
                            Ok(0) => break Ok(()),
                            Ok(n) => {
                                filled += n;
                                if filled == block.len() {
                                    break Ok(());
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => break Err(e),
                        }
                    };
                    block.truncate(filled);
                    // An empty block is the end: sent only once the source said so.
                    let last = read.is_err() || filled == 0;
                    let sent = match read {
                        Ok(()) => send.send(Ok(block)),
                        Err(e) if filled == 0 => send.send(Err(e)),
                        Err(e) => send.send(Ok(block)).and_then(|()| send.send(Err(e))),
                    };
                    if last || sent.is_err() {
                        return;
                    }
                }
            })
            .expect("a thread can be started");
        ReadAhead { blocks, block: Vec::new(), at: 0, ended: None }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.block.len() {
            if let Some(ended) = &self.ended {
                return match ended {
                    None => Ok(0),
                    Some((kind, message)) => Err(io::Error::new(*kind, message.clone())),
                };
            }
            match self.blocks.recv() {
                Ok(Ok(block)) if block.is_empty() => self.ended = Some(None),
                Ok(Ok(block)) => (self.block, self.at) = (block, 0),
                Ok(Err(e)) => self.ended = Some(Some((e.kind(), e.to_string()))),
                Err(_) => self.ended = Some(Some((io::ErrorKind::BrokenPipe, "the read-ahead thread ended early".into()))),
            }
        }
        let n = buf.len().min(self.block.len() - self.at);
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// An upstream artifact in the store, parsed only when a stage asks for the whole of it.
pub(crate) struct StoredInput {
    pub(crate) path: PathBuf,
    pub(crate) digest: Digest,
    value: OnceLock<Result<Value, StageError>>,
}

impl StoredInput {
    pub(crate) fn new(path: PathBuf, digest: Digest) -> Self {
        StoredInput { path, digest, value: OnceLock::new() }
    }

    pub(crate) fn value(&self, port: &str) -> Result<&Value, StageError> {
        let got = self.value.get_or_init(|| {
            let bytes = crate::store::read_object(&self.path).map_err(|e| self.missing(port, e))?;
            if Digest::of_bytes(&bytes) != self.digest {
                return Err(self.damaged(port));
            }
            serde_json::from_slice(&bytes).map_err(|e| StageError::new(format!("input `{port}` is not JSON: {e}")))
        });
        got.as_ref().map_err(Clone::clone)
    }

    fn missing(&self, port: &str, e: io::Error) -> StageError {
        StageError::new(format!("input `{port}` ({}) cannot be read from the store: {e}", self.digest.short()))
    }

    fn damaged(&self, port: &str) -> StageError {
        StageError::new(format!("input `{port}` ({}) is damaged in the store (its bytes no longer match their digest); run again to compute it anew", self.digest.short()))
    }

    /// The artifact's bytes copied to `out`, checked against the digest as they are read: the
    /// last block is written only once the whole has been checked, so a damaged artifact never
    /// reaches `out` whole (its JSON ends short, and this fails).
    pub(crate) fn copy_to(&self, port: &str, out: &mut dyn Write) -> Result<(), StageError> {
        // Read here, not ahead: the program reading `out` has the other core.
        let file = crate::store::open_object(&self.path).map_err(|e| self.missing(port, e))?;
        let mut reader = Verifying::new(file, self.digest, String::new());
        let failed = |e: io::Error| StageError::new(format!("writing input `{port}`: {e}"));
        let (mut held, mut block) = (Vec::with_capacity(1 << 16), vec![0; 1 << 16]);
        loop {
            let n = match reader.read(&mut block) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(self.damaged(port)),
            };
            if n == 0 {
                // The end, reached only once the whole was found to match the digest.
                break;
            }
            out.write_all(&held).map_err(failed)?;
            held.clear();
            held.extend_from_slice(&block[..n]);
        }
        out.write_all(&held).map_err(failed)
    }

    /// The artifact read ahead ([`ReadAhead`]), unpacked and verified: its end is an error
    /// unless the whole matched the digest.
    fn read_ahead(&self, port: &str) -> Result<ReadAhead, StageError> {
        let file = crate::store::open_object(&self.path).map_err(|e| self.missing(port, e))?;
        Ok(ReadAhead::new(Verifying::new(file, self.digest, self.damaged(port).message)))
    }

    /// Checks the file against the digest, reading it through once.
    fn verified(&self, port: &str) -> Result<(), StageError> {
        let mut hasher = blake3::Hasher::new();
        let damaged = |_| self.damaged(port);
        hasher.update_reader(crate::store::open_object(&self.path).map_err(|e| self.missing(port, e))?).map_err(damaged)?;
        if Digest(*hasher.finalize().as_bytes()) != self.digest {
            return Err(self.damaged(port));
        }
        Ok(())
    }

    /// As [`Self::each_element`], the file verified as it is scanned, not before: a damaged one
    /// fails the visit at its end, after `f` has seen what it held. For a reader that discards
    /// what it did when the visit fails (the engine's listing of a stage's items), this reads the
    /// artifact once instead of twice.
    pub(crate) fn scan_elements(&self, port: &str, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<(), StageError>) -> Result<(), StageError> {
        if let Some(Ok(value)) = self.value.get() {
            return each_element_in_value(value, port, key, f);
        }
        let mut reader = self.read_ahead(port)?;
        let scanned = each_in_canonical(&mut reader, port, key, f);
        // What follows the list is read (and hashed) too; a damaged file is reported as such,
        // whatever else its scan found.
        if io::copy(&mut reader, &mut io::sink()).is_err() {
            return Err(self.damaged(port));
        }
        scanned
    }

    /// Visits each element of the array at `key` (a top-level key of the artifact) without
    /// holding the artifact: the file is verified against its digest first, then scanned.
    pub(crate) fn each<T: DeserializeOwned>(&self, port: &str, key: &str, f: &mut dyn FnMut(T) -> Result<(), StageError>) -> Result<(), StageError> {
        self.each_element(port, key, &mut |element| f(parse_element(element, port, key)?))
    }

    /// As [`Self::each`], each element given as its canonical JSON.
    pub(crate) fn each_element(&self, port: &str, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<(), StageError>) -> Result<(), StageError> {
        if let Some(Ok(value)) = self.value.get() {
            return each_element_in_value(value, port, key, f);
        }
        self.verified(port)?;
        let file = crate::store::open_object(&self.path).map_err(|e| self.missing(port, e))?;
        each_in_canonical(file, port, key, f)
    }
}

/// [`StoredInput::each`] over an artifact already in memory.
pub(crate) fn each_in_value<T: DeserializeOwned>(value: &Value, port: &str, key: &str, f: &mut dyn FnMut(T) -> Result<(), StageError>) -> Result<(), StageError> {
    for element in elements_in_value(value, port, key)? {
        f(T::deserialize(element).map_err(|e| not_read(e, port, key))?)?;
    }
    Ok(())
}

/// [`StoredInput::each_element`] over an artifact already in memory.
pub(crate) fn each_element_in_value(value: &Value, port: &str, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<(), StageError>) -> Result<(), StageError> {
    for element in elements_in_value(value, port, key)? {
        f(&crate::hash::canonical_json(element))?;
    }
    Ok(())
}

fn elements_in_value<'v>(value: &'v Value, port: &str, key: &str) -> Result<&'v Vec<Value>, StageError> {
    value.get(key).and_then(Value::as_array).ok_or_else(|| StageError::new(format!("input `{port}` has no list `{key}`")))
}

/// An element of the list `key` of input `port`, read from its JSON as the stage's type (what
/// [`crate::Stage::element_items`] is given).
pub fn parse_element<T: DeserializeOwned>(element: &[u8], port: &str, key: &str) -> Result<T, StageError> {
    serde_json::from_slice(element).map_err(|e| not_read(e, port, key))
}

fn not_read(e: serde_json::Error, port: &str, key: &str) -> StageError {
    StageError::new(format!("an element of `{key}` in input `{port}` is not what this stage reads: {e}"))
}

/// The elements of the array at `key` in canonical JSON (what the store holds: no whitespace,
/// keys sorted), found by a scan of the bytes (strings and nesting) and each parsed from its
/// slice, several times faster than parsing from a reader.
fn each_in_canonical(reader: impl Read, port: &str, key: &str, f: &mut dyn FnMut(&[u8]) -> Result<(), StageError>) -> Result<(), StageError> {
    let mut scan = Scanner { reader, buf: Vec::with_capacity(1 << 20), at: 0, eof: false };
    let broken = |e: io::Error| StageError::new(format!("input `{port}` cannot be read: {e}"));
    let not_canonical = || StageError::new(format!("input `{port}` is not canonical JSON"));
    if scan.byte().map_err(broken)? != Some(b'{') {
        return Err(not_canonical());
    }
    let wanted = serde_json::to_vec(key).expect("a string serializes");
    loop {
        let name = scan.value().map_err(broken)?;
        let is_key = name.as_deref() == Some(&wanted[..]);
        if name.is_none() || scan.byte().map_err(broken)? != Some(b':') {
            return Err(not_canonical());
        }
        if is_key {
            if scan.byte().map_err(broken)? != Some(b'[') {
                return Err(not_canonical());
            }
            if scan.peek().map_err(broken)? == Some(b']') {
                return Ok(());
            }
            loop {
                let element = scan.value().map_err(broken)?.ok_or_else(not_canonical)?;
                f(&element)?;
                match scan.byte().map_err(broken)? {
                    Some(b',') => continue,
                    Some(b']') => return Ok(()),
                    _ => return Err(not_canonical()),
                }
            }
        }
        if scan.value().map_err(broken)?.is_none() {
            return Err(not_canonical());
        }
        match scan.byte().map_err(broken)? {
            Some(b',') => continue,
            Some(b'}') => return Err(StageError::new(format!("input `{port}` has no list `{key}`"))),
            _ => return Err(not_canonical()),
        }
    }
}

/// Bytes of canonical JSON read in large blocks, one value at a time.
struct Scanner<R> {
    reader: R,
    buf: Vec<u8>,
    at: usize,
    eof: bool,
}

impl<R: Read> Scanner<R> {
    /// At least one more byte in `buf` (false: the end).
    fn fill(&mut self) -> io::Result<bool> {
        if self.at < self.buf.len() {
            return Ok(true);
        }
        if self.eof {
            return Ok(false);
        }
        self.buf.clear();
        self.at = 0;
        self.buf.resize(1 << 20, 0);
        let n = self.reader.read(&mut self.buf)?;
        self.buf.truncate(n);
        self.eof = n == 0;
        Ok(n > 0)
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        Ok(if self.fill()? { Some(self.buf[self.at]) } else { None })
    }

    fn byte(&mut self) -> io::Result<Option<u8>> {
        let b = self.peek()?;
        self.at += usize::from(b.is_some());
        Ok(b)
    }

    /// The bytes of the next value (a string, number, literal, object or array), found by its
    /// nesting and its strings' quotes and escapes; `None` at the end or before a delimiter.
    fn value(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut out = Vec::new();
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        loop {
            if !self.fill()? {
                return Ok(if depth == 0 && !in_string && !out.is_empty() { Some(out) } else { None });
            }
            let start = self.at;
            let chunk = &self.buf[start..];
            let mut end = None;
            let mut i = 0;
            while i < chunk.len() {
                let b = chunk[i];
                if in_string {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                        if depth == 0 {
                            end = Some(i + 1);
                            break;
                        }
                    } else {
                        // A string's text, skipped to its next quote or escape.
                        i = memchr::memchr2(b'"', b'\\', &chunk[i..]).map_or(chunk.len(), |at| i + at);
                        continue;
                    }
                    i += 1;
                    continue;
                }
                let at = i;
                i += 1;
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth == 0 => {
                        end = Some(at);
                        break;
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(at + 1);
                            break;
                        }
                    }
                    b',' | b':' if depth == 0 => {
                        end = Some(at);
                        break;
                    }
                    _ => {}
                }
            }
            match end {
                Some(i) => {
                    out.extend_from_slice(&chunk[..i]);
                    self.at = start + i;
                    return Ok(if out.is_empty() { None } else { Some(out) });
                }
                None => {
                    out.extend_from_slice(chunk);
                    self.at = self.buf.len();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::canonical_json;
    use serde_json::json;

    #[test]
    fn read_ahead_gives_every_byte_then_the_end_or_the_error_that_stays() {
        let bytes: Vec<u8> = (0..ReadAhead::BLOCK * 3 + 17).map(|i| (i % 251) as u8).collect();
        let mut whole = Vec::new();
        ReadAhead::new(io::Cursor::new(bytes.clone())).read_to_end(&mut whole).unwrap();
        assert_eq!(whole, bytes);
        // Verified: the bytes digested end; others fail at their end, after every byte.
        let digest = Digest::of_bytes(&bytes);
        let verified = |data: Vec<u8>| ReadAhead::new(Verifying::new(io::Cursor::new(data), digest, "damaged".into()));
        assert!(verified(bytes.clone()).read_to_end(&mut Vec::new()).is_ok());
        let mut damaged = bytes.clone();
        damaged[ReadAhead::BLOCK + 5] ^= 1;
        let (mut reader, mut got) = (verified(damaged.clone()), vec![0; damaged.len()]);
        reader.read_exact(&mut got).unwrap();
        assert_eq!(got, damaged);
        for _ in 0..2 {
            let e = reader.read(&mut [0; 8]).unwrap_err();
            assert_eq!((e.kind(), e.to_string()), (io::ErrorKind::InvalidData, "damaged".to_string()));
        }
        // Dropped before its end: its thread stops, and lets go of its endless source.
        struct Endless(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                buf.fill(7);
                Ok(buf.len())
            }
        }
        impl Drop for Endless {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut early = ReadAhead::new(Endless(dropped.clone()));
        early.read_exact(&mut [0; 100]).unwrap();
        drop(early);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dropped.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "the read-ahead thread still runs after its reader was dropped");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The elements of `value`'s `samples`, as a scan of its canonical JSON finds them.
    fn scanned(value: &Value) -> Value {
        let mut elements = Vec::new();
        each_in(&canonical_json(value)[..], "p", "samples", &mut |v: Value| {
            elements.push(v);
            Ok(())
        })
        .unwrap();
        Value::Array(elements)
    }

    /// [`each_in_canonical`], each element parsed.
    fn each_in(reader: &[u8], port: &str, key: &str, f: &mut dyn FnMut(Value) -> Result<(), StageError>) -> Result<(), StageError> {
        each_in_canonical(reader, port, key, &mut |element| f(parse_element(element, port, key)?))
    }

    #[test]
    fn a_streamed_output_is_the_canonical_json_of_the_whole() {
        let whole = json!({"a": 1, "samples": [{"z": 1, "b": [2, 1]}, {"id": "x"}], "total": {"y": 2, "x": 1}});
        let mut bytes = Vec::new();
        let mut w = OutputWriter::new(&mut bytes);
        w.field("a", &1).unwrap();
        w.elements("samples", [json!({"z": 1, "b": [2, 1]}), json!({"id": "x"})].into_iter().map(Ok)).unwrap();
        w.field("total", &json!({"y": 2, "x": 1})).unwrap();
        w.finish().unwrap();
        assert_eq!(String::from_utf8(bytes).unwrap(), String::from_utf8(canonical_json(&whole)).unwrap());
        let mut empty = Vec::new();
        OutputWriter::new(&mut empty).finish().unwrap();
        assert_eq!(empty, b"{}");
    }

    #[test]
    fn an_input_copied_out_is_checked_and_a_damaged_one_never_arrives_whole() {
        let dir = tempfile::tempdir().unwrap();
        let value = json!({"samples": (0..20_000).map(|n| json!({"id": n})).collect::<Vec<_>>()});
        let bytes = canonical_json(&value);
        let path = dir.path().join("object");
        std::fs::write(&path, &bytes).unwrap();
        let input = StoredInput::new(path.clone(), Digest::of_bytes(&bytes));
        let mut out = Vec::new();
        input.copy_to("p", &mut out).unwrap();
        assert_eq!(out, bytes);
        let mut damaged = bytes.clone();
        damaged[1000] = b'7';
        std::fs::write(&path, &damaged).unwrap();
        let mut out = Vec::new();
        let e = input.copy_to("p", &mut out).unwrap_err();
        assert!(e.message.contains("is damaged in the store"), "{}", e.message);
        assert!(out.len() < bytes.len() && bytes.starts_with(&out[..999]), "{} of {} bytes written", out.len(), bytes.len());
    }

    #[test]
    fn elements_are_visited_one_at_a_time_and_a_stop_is_the_stages_error() {
        let whole = json!({"a": {"samples": 0}, "samples": [{"n": 1}, {"n": 2}, {"n": 3}], "z": [9]});
        let mut seen = Vec::new();
        each_in(&canonical_json(&whole)[..], "p", "samples", &mut |v: Value| {
            seen.push(v["n"].as_i64().unwrap());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [1, 2, 3]);
        let stop = each_in(&canonical_json(&whole)[..], "p", "samples", &mut |v: Value| if v["n"] == 2 { Err(StageError::new("enough")) } else { Ok(()) });
        assert_eq!(stop.unwrap_err().message, "enough");
        let missing = each_in(&canonical_json(&whole)[..], "p", "rows", &mut |_: Value| Ok(()));
        assert_eq!(missing.unwrap_err().message, "input `p` has no list `rows`");
        // Strings holding brackets, quotes and escapes do not mislead the scan.
        let tricky = json!({"a": "]}\\\"", "samples": [{"n": 1, "s": "[{\\\",:"}, {"n": 2}, {"n": 3, "x": [[]]}], "z": [9]});
        assert_eq!(scanned(&tricky), tricky["samples"]);
        // Strings longer than the scanner's block, escapes and quotes across its edges.
        let long: String = (0..300_000).map(|n| if n % 7 == 0 { "q\"\\]}" } else { "word " }).collect();
        let big = json!({"samples": [{"s": long.clone()}, {"s": format!("{long}\\")}, {"n": 3}]});
        assert_eq!(scanned(&big), big["samples"]);
        let pretty = serde_json::to_vec_pretty(&tricky).unwrap();
        let refused = each_in(&pretty[..], "p", "samples", &mut |_: Value| Ok(()));
        assert_eq!(refused.unwrap_err().message, "input `p` is not canonical JSON");
        let mut empty = 0;
        each_in(&canonical_json(&json!({"samples": []}))[..], "p", "samples", &mut |_: Value| Ok(empty += 1)).unwrap();
        assert_eq!(empty, 0);
        let mut from_value = Vec::new();
        each_in_value(&whole, "p", "samples", &mut |v: Value| {
            from_value.push(v["n"].as_i64().unwrap());
            Ok(())
        })
        .unwrap();
        assert_eq!(from_value, seen);
    }
}
