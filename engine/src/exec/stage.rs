//! One stage's execution: fresh from the store, or its items run (memoized one by one) and its
//! output assembled, stored and checked against the lockfile.

use super::*;
use crate::store::{ItemReader, chunks};

pub(super) async fn run_stage(
    ctx: &Arc<Ctx>,
    iteration: u32,
    i: usize,
    inputs: BTreeMap<String, Digest>,
    stable_inputs: BTreeMap<String, Digest>,
) -> Result<StageDone, StageFail> {
    let pipeline = &ctx.pipeline;
    let node = &pipeline.stages[i];
    let fp = fingerprint(pipeline, &ctx.files, i, &inputs);
    let digest = fp.digest();
    if let Some(lock) = &ctx.locked {
        // The lockfile pins fingerprints over stable upstream digests: measurements may differ.
        let fp = Fingerprint { inputs: stable_inputs.clone(), ..fp.clone() };
        let digest = fp.digest();
        match lock.stage(&node.id, iteration) {
            None => {
                return Err(StageFail::Fatal(RunError::LockMismatch(format!(
                    "stage `{}` (iteration {}) is not in the lockfile",
                    node.id,
                    iteration + 1
                ))));
            }
            Some(locked) if locked.fingerprint != digest => {
                return Err(StageFail::Fatal(RunError::LockMismatch(format!(
                    "stage `{}` (iteration {}) differs from the lockfile: {}",
                    node.id,
                    iteration + 1,
                    locked.differences(&fp).join(", ")
                ))));
            }
            Some(_) => {}
        }
    }
    let previous: Option<Record> = ctx.store.get_record(&pipeline.name, &node.id);
    if let Some(output) = ctx.store.get_done(&digest) {
        ctx.emit(Event::Fresh { iteration, stage: node.id.clone() });
        if previous.as_ref().is_none_or(|r| r.fingerprint != fp || r.output != output.full) {
            ctx.store.put_record(&pipeline.name, &node.id, &Record { fingerprint: fp.clone(), output: output.full })?;
        }
        check_locked_output(ctx, iteration, node, &output)?;
        return Ok(StageDone { fingerprint: fp, stable_inputs, output, executed: false, items_run: 0, items_cached: 0 });
    }
    let reasons = dirty_reasons(&fp, previous.as_ref());

    let stored = load_inputs(&ctx.store, &inputs).map_err(StageFail::Error)?;
    let input = Arc::new(stage_input(pipeline, &ctx.files, i, stored, Cancel(ctx.cancel.clone()), &ctx.store));
    // The items, one at a time (a million samples are never listed at once): each one's memo
    // key, whether it is cached, and the first few still to run, kept to run without listing
    // the items again.
    let listed = {
        let (stage, input, fp, store) = (node.stage.clone(), input.clone(), fp.clone(), ctx.store.clone());
        tokio::task::spawn_blocking(move || {
            let mut listed = Listed::default();
            let reader = store.item_reader();
            if let Some(from) = stage.items_of_elements().filter(|(port, _)| input.is_stored(port)) {
                return list_by_elements(&*stage, &input, from, &fp, &reader, &mut listed).map(|()| listed);
            }
            // Items wait for the end of their chunk: a chunk kept whole has all its items cached
            // (one lookup for about a thousand of them).
            let mut chunk = Vec::new();
            stage
                .each_item(&input, &mut |item| {
                    let key = fp.item_key(&item.input);
                    let ends = chunks::ends_chunk(&key, chunk.len() + 1);
                    chunk.push((key, item));
                    if ends {
                        listed.settle(&reader, &mut chunk);
                    }
                    Ok(())
                })
                .map(|()| {
                    listed.settle(&reader, &mut chunk);
                    listed
                })
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(|e| StageFail::Error(e.message))?
    };
    let Listed { keys, spans, pending, held, groups } = listed;
    let cached = keys.len() - pending.len();
    ctx.emit(Event::Started { iteration, stage: node.id.clone(), reasons, items: keys.len(), cached_items: cached, groups });

    // What a stage that builds its output whole gets: every result, the fresh ones as computed.
    let streams = node.stage.streams_output();
    let mut fresh: BTreeMap<usize, Value> = BTreeMap::new();
    let mut to_run = pending_items(node.stage.clone(), input.clone(), &pending, held);
    let limit = node.stage.item_concurrency().max(1);
    let mut running: JoinSet<(usize, Item, Result<Value, crate::stage::StageError>)> = JoinSet::new();
    // A failed item does not stop the others: everything that succeeds is kept, and a rerun
    // retries only what failed. Failures in a row (a server down, a systematic bug) stop the
    // stage early instead of failing every item one by one.
    let give_up_after = limit.max(5);
    let (mut failures, mut failed_in_a_row) = (Vec::<String>::new(), 0);
    let mut interrupted = false;
    let (mut ran, mut started) = (0, 0);
    let mut done: Vec<(tokio::time::Instant, usize, Item, Value)> = Vec::new();
    // The stage's items share a compression dictionary in the store.
    let family = format!("{}/{}", pipeline.name, node.id);
    // Many items are appended to the store's item log as they finish, and sorted into its item
    // table once they are done ([`Store::log_items`]); a few go straight into the table.
    let logged = pending.len() >= LOGGED_AT;
    // A chunk of results whose items all run is kept whole as its last one is: the output is
    // then written from chunks, not from a million lookups of one result each.
    let mut assembling = (streams && node.stage.output_holds_results()).then(|| Assembling::new(&spans, &pending));
    let mut commit = |done: &mut Vec<(tokio::time::Instant, usize, Item, Value)>| -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        // Each result serialized once: memoized, and kept in its chunk, as these bytes.
        let json: Vec<Vec<u8>> = done.iter().map(|(.., value)| crate::hash::canonical_json(value)).collect();
        let batch = {
            let rows = done.iter().zip(&json).map(|((_, k, ..), json)| (&keys[*k], &json[..])).collect::<Vec<_>>();
            if logged { ctx.store.log_items(&family, &rows) } else { ctx.store.put_items(&family, &rows) }
        };
        for ((_, k, item, value), json) in done.drain(..).zip(json) {
            if let Err(e) = &batch {
                // The commit failed (a full disk): each item that still fits is kept alone.
                if let Err(alone) = ctx.store.put_item(&family, &keys[k], &value) {
                    tracing::debug!("a batch of items could not be kept ({e}); nor this one: {alone}");
                    return Err(alone);
                }
            }
            ran += 1;
            ctx.emit(Event::Item { iteration, stage: node.id.clone(), item: item.id });
            if let Some(assembling) = assembling.as_mut() {
                assembling.add(&ctx.store, &spans, k, json);
            }
            if !streams {
                fresh.insert(k, value);
            }
        }
        Ok(())
    };
    loop {
        while running.len() < limit && failed_in_a_row < give_up_after {
            if ctx.cancel.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let Some((k, item)) = to_run.next().await else { break };
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    commit(&mut done)?;
                    return Err(StageFail::Error(e.message));
                }
            };
            started += 1;
            let (stage, cx) = (node.stage.clone(), ItemContext {
                seed: pipeline.seed,
                cancel: Cancel(ctx.cancel.clone()),
                progress: ItemProgress(Some((ctx.observer.clone(), iteration, node.id.clone(), item.id.clone()))),
            });
            running.spawn(async move {
                let result = stage.run_item(&item, &cx).await;
                (k, item, result)
            });
        }
        // Items that run many at a time wait, once finished (at most COMMIT_WITHIN, at most
        // COMMIT_AT_MOST of them), to be memoized in one commit, and are reported only then: a
        // kill never loses an item reported finished, and cheap items do not cost a commit each.
        let due = done.first().map(|(since, ..)| *since + COMMIT_WITHIN);
        let joined = match due {
            None => running.join_next().await,
            Some(due) => tokio::select! {
                joined = running.join_next() => joined,
                () = tokio::time::sleep_until(due) => {
                    commit(&mut done)?;
                    continue;
                }
            },
        };
        let Some(joined) = joined else { break };
        let (k, item, result) = joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        match result {
            Ok(value) => {
                done.push((tokio::time::Instant::now(), k, item, value));
                failed_in_a_row = 0;
                // One item at a time: each is kept and reported before the next starts.
                if limit == 1 || done.len() >= COMMIT_AT_MOST {
                    commit(&mut done)?;
                }
            }
            Err(e) => {
                tracing::warn!(stage = node.id, item = item.id, "item failed: {}", e.message);
                failures.push(format!("item `{}`: {}", item.id, e.message));
                failed_in_a_row += 1;
            }
        }
    }
    let committed = commit(&mut done);
    drop(to_run);
    if logged {
        // Whatever ended the stage: its finished items are seen by lookups from now on.
        ctx.store.settle_items()?;
    }
    committed?;
    if let Some(first) = failures.first() {
        let n = failures.len();
        return Err(StageFail::Error(if failed_in_a_row >= give_up_after {
            format!("stopped after {failed_in_a_row} items failed in a row ({} not started); finished items are kept. First: {first}", pending.len() - started)
        } else if n == 1 {
            first.clone()
        } else {
            format!("{n} items failed; finished items are kept and a rerun retries only the failed ones. First: {first}")
        }));
    }
    if interrupted {
        return Err(StageFail::Interrupted);
    }
    let stage = node.stage.clone();
    let (finish_input, store) = (input.clone(), ctx.store.clone());
    let output = if streams {
        let full = tokio::task::spawn_blocking(move || write_streamed(&*stage, &finish_input, &store, &keys, &spans))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?
            .map_err(|e| StageFail::Error(e.message))?;
        Outputs { full, stable: full }
    } else {
        let value = tokio::task::spawn_blocking(move || {
            // Every item again, each with its result: fresh ones as computed, cached ones read back.
            let mut results = Vec::with_capacity(keys.len());
            stage.each_item(&finish_input, &mut |item| {
                let k = results.len();
                let value = match fresh.remove(&k) {
                    Some(v) => v,
                    None => store.get_item(&keys[k]).ok_or_else(|| StageError::new(format!("item `{}` vanished from the store while the stage ran", item.id)))?,
                };
                results.push((item, value));
                Ok(())
            })?;
            stage.finish(&finish_input, results)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(|e| StageFail::Error(e.message))?;
        let full = ctx.store.put_object(&value)?;
        let volatile = node.stage.volatile_keys();
        let stable = if volatile.is_empty() { full } else { Digest::of_json(&without_keys(&value, volatile)) };
        Outputs { full, stable }
    };
    let full = output.full;
    ctx.store.put_done(&digest, &output)?;
    let unchanged = previous.as_ref().is_some_and(|r| r.output == full);
    ctx.store.put_record(&pipeline.name, &node.id, &Record { fingerprint: fp.clone(), output: full })?;
    ctx.emit(Event::Finished { iteration, stage: node.id.clone(), output: full, unchanged });
    check_locked_output(ctx, iteration, node, &output)?;
    Ok(StageDone { fingerprint: fp, stable_inputs, output, executed: true, items_run: ran, items_cached: cached })
}

/// At most this many finished items are memoized in one commit, and none waits longer than
/// `COMMIT_WITHIN` for it.
const COMMIT_AT_MOST: usize = 256;
const COMMIT_WITHIN: std::time::Duration = std::time::Duration::from_millis(20);

/// A stage with at least this many items to run logs them ([`Store::log_items`]): under it, what
/// sorting the log in costs is more than what it saves.
const LOGGED_AT: usize = 4096;

/// How many of the items still to run are kept from the listing (beyond it, they are listed
/// again as they run: a first run over a million samples holds none of them).
const HELD_PENDING: usize = 4096;

/// What listing a stage's items found.
struct Listed {
    /// Every item's memo key, in order (for the items of a chunk found kept by its listing,
    /// stand-ins: their results are read by the chunk's key, [`Span::stand_ins`]).
    keys: Vec<Digest>,
    /// The chunks of them ([`chunks`]), in order.
    spans: Vec<Span>,
    /// The positions of the items not cached.
    pending: Vec<usize>,
    /// Those items, while there are no more than [`HELD_PENDING`].
    held: Option<Vec<Item>>,
    groups: Vec<ItemGroup>,
}

impl Listed {
    /// A chunk's items, listed: all cached when the chunk is kept whole, else each as its own
    /// row says.
    fn settle(&mut self, reader: &ItemReader, chunk: &mut Vec<(Digest, Item)>) {
        if chunk.is_empty() {
            return;
        }
        let results = chunks::chunk_key(chunk.iter().map(|(key, _)| key));
        let whole = reader.has_chunk(&results);
        for (key, item) in chunk.drain(..) {
            let cached = whole || reader.has(&key);
            self.count(&item.id, cached);
            if !cached {
                self.pending.push(self.keys.len());
                if let Some(held) = self.held.as_mut() {
                    if held.len() < HELD_PENDING { held.push(item) } else { self.held = None }
                }
            }
            self.keys.push(key);
        }
        self.spans.push(Span { end: self.keys.len(), results, stand_ins: false });
    }

    /// A chunk of items listed before, whose results are kept whole: all cached.
    fn settle_cached(&mut self, listing: &chunks::Listing) {
        if listing.items == 0 {
            return;
        }
        for (name, items) in &listing.groups {
            self.count_group(name, *items, *items);
        }
        self.keys.resize(self.keys.len() + listing.items, Digest([0; 32]));
        self.spans.push(Span { end: self.keys.len(), results: listing.results, stand_ins: true });
    }

    /// The item `id` in its group's counts, if it is in one.
    fn count(&mut self, id: &str, cached: bool) {
        if let Some(name) = item_group(id) {
            self.count_group(name, 1, usize::from(cached));
        }
    }

    fn count_group(&mut self, name: &str, items: usize, cached: usize) {
        let at = match self.groups.iter().position(|g| g.name == name) {
            Some(at) => at,
            None => {
                self.groups.push(ItemGroup { name: name.to_string(), items: 0, cached_items: 0 });
                self.groups.len() - 1
            }
        };
        self.groups[at].items += items;
        self.groups[at].cached_items += cached;
    }
}

/// The chunks of results being assembled as their items finish (those whose items all run).
struct Assembling {
    /// By chunk: its results so far, by position in it (`None`: not finished yet), and how many.
    chunks: HashMap<usize, (Vec<Option<Vec<u8>>>, usize)>,
    /// Chunks whose items all run.
    whole: Vec<bool>,
    /// Bytes held in all.
    held: usize,
}

/// Results held while their chunks are assembled: past this, what is held is let go (those
/// chunks are read item by item when the output is written, as any other).
const ASSEMBLING_BYTES: usize = 64 << 20;

impl Assembling {
    fn new(spans: &[Span], pending: &[usize]) -> Assembling {
        let mut whole = Vec::with_capacity(spans.len());
        let (mut start, mut p) = (0, 0);
        for span in spans {
            let from = p;
            while p < pending.len() && pending[p] < span.end {
                p += 1;
            }
            whole.push(p - from == span.end - start);
            start = span.end;
        }
        Assembling { chunks: HashMap::new(), whole, held: 0 }
    }

    /// The result of item `k` (its canonical JSON), committed; the chunk it completes is kept.
    fn add(&mut self, store: &Store, spans: &[Span], k: usize, bytes: Vec<u8>) {
        let at = spans.partition_point(|span| span.end <= k);
        if !self.whole.get(at).copied().unwrap_or(false) {
            return;
        }
        let start = if at == 0 { 0 } else { spans[at - 1].end };
        self.held += bytes.len();
        let (results, filled) = self.chunks.entry(at).or_insert_with(|| (vec![None; spans[at].end - start], 0));
        match results[k - start].replace(bytes) {
            None => *filled += 1,
            Some(before) => self.held -= before.len(),
        }
        if *filled == results.len() {
            let (results, _) = self.chunks.remove(&at).expect("present");
            let results: Vec<Vec<u8>> = results.into_iter().flatten().collect();
            self.held -= results.iter().map(Vec::len).sum::<usize>();
            // Only saves reading them one by one: not kept, they still are.
            if let Err(e) = store.put_chunk(&spans[at].results, &results) {
                tracing::debug!("a chunk of {} results could not be kept whole: {e}", results.len());
            }
        } else if self.held > ASSEMBLING_BYTES {
            self.chunks.clear();
            self.held = 0;
            self.whole.fill(false);
        }
    }
}

/// A chunk of a stage's items, as listed.
struct Span {
    /// Where it ends in the items.
    end: usize,
    /// The key of its chunk of results ([`chunks::chunk_key`] of its items' keys).
    results: Digest,
    /// Whether its items' keys are stand-ins: the listing found the chunk of results kept whole
    /// without knowing them.
    stand_ins: bool,
}

/// A chunk of elements holds at most this many bytes (and [`chunks::LONGEST`] elements).
const ELEMENT_CHUNK_BYTES: usize = 8 << 20;

/// The items of a stage with [`Stage::items_of_elements`], listed a chunk of elements at a time
/// (cut by their content: [`chunks::content_ends_chunk`]). A chunk listed before gives what it
/// listed as kept ([`chunks::Listing`]: its chunk of results' key, how many items, their groups);
/// when that chunk of results is kept whole (it is cut where the elements' chunk is) its items are
/// all cached, and nothing is parsed. Another chunk's elements are parsed and made into items,
/// which are keyed, and what the chunk listed is kept.
fn list_by_elements(stage: &dyn Stage, input: &StageInput, (port, list): (&str, &str), fp: &Fingerprint, reader: &ItemReader, listed: &mut Listed) -> Result<(), StageError> {
    // What the items depend on besides their elements.
    let stage_key = {
        let mut fp = fp.clone();
        fp.inputs.remove(port);
        fp.digest()
    };
    let kept = input.kept();
    let mut make = None;
    let mut flush = |bytes: &mut Vec<u8>, ends: &mut Vec<usize>| -> Result<(), StageError> {
        if ends.is_empty() {
            return Ok(());
        }
        let key = chunks::elements_key(&stage_key, bytes, ends);
        let known = kept.get(&key).and_then(|records| chunks::Listing::decode(&records));
        if let Some(listing) = known.as_ref().filter(|listing| listing.items == 0 || reader.has_chunk(&listing.results)) {
            listed.settle_cached(listing);
        } else {
            let make = match &mut make {
                Some(make) => make,
                None => make.insert(stage.element_items(input)?),
            };
            let (mut chunk, mut start) = (Vec::new(), 0);
            for &end in ends.iter() {
                if let Some(item) = make(&bytes[start..end])? {
                    chunk.push((fp.item_key(&item.input), item));
                }
                start = end;
            }
            if known.is_none() {
                kept.put(&key, &chunks::Listing::of(chunk.iter().map(|(key, item)| (key, item.id.as_str()))).encode());
            }
            listed.settle(reader, &mut chunk);
        }
        bytes.clear();
        ends.clear();
        Ok(())
    };
    let (mut bytes, mut ends) = (Vec::new(), Vec::new());
    // Verified as it is read: a damaged input fails the listing, and what it listed is not used.
    input.scan_elements(port, list, |element| {
        bytes.extend_from_slice(element);
        ends.push(bytes.len());
        if chunks::content_ends_chunk(element) || ends.len() >= chunks::LONGEST || bytes.len() >= ELEMENT_CHUNK_BYTES {
            flush(&mut bytes, &mut ends)?;
        }
        Ok(())
    })?;
    flush(&mut bytes, &mut ends)
}

impl Default for Listed {
    fn default() -> Self {
        Listed { keys: Vec::new(), spans: Vec::new(), pending: Vec::new(), held: Some(Vec::new()), groups: Vec::new() }
    }
}

/// The items to run, with their positions: the ones held, or listed again, in batches.
enum ToRun {
    Held(std::iter::Zip<std::vec::IntoIter<usize>, std::vec::IntoIter<Item>>),
    Listed(tokio::sync::mpsc::Receiver<Vec<(usize, Result<Item, StageError>)>>, std::vec::IntoIter<(usize, Result<Item, StageError>)>),
}

/// Items listed again go to the runner this many at a time (one wake-up per batch)...
const BATCH: usize = 64;
/// ... and to a streamed output's writer this many.
const STREAMED_BATCH: usize = 256;

impl ToRun {
    async fn next(&mut self) -> Option<(usize, Result<Item, StageError>)> {
        match self {
            ToRun::Held(items) => items.next().map(|(k, item)| (k, Ok(item))),
            ToRun::Listed(rx, batch) => loop {
                if let Some(next) = batch.next() {
                    return Some(next);
                }
                *batch = rx.recv().await?.into_iter();
            },
        }
    }
}

fn pending_items(stage: Arc<dyn Stage>, input: Arc<StageInput>, pending: &[usize], held: Option<Vec<Item>>) -> ToRun {
    if let Some(held) = held {
        return ToRun::Held(pending.to_vec().into_iter().zip(held));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let pending = pending.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut next = 0;
        let pick = |at, item| {
            (pending.get(next) == Some(&at)).then(|| {
                next += 1;
                (at, Ok(item))
            })
        };
        // The runner stopped (a failure, Ctrl-C): so does the listing.
        let (listed, mut rest) = each_item_batched(&*stage, &input, BATCH, pick, |batch| tx.blocking_send(batch).map_err(|_| StageError::new("stopped")));
        if let Err(e) = listed {
            if tx.is_closed() {
                return;
            }
            rest.push((usize::MAX, Err(e)));
        }
        let _ = tx.blocking_send(rest);
    });
    ToRun::Listed(rx, Vec::new().into_iter())
}

/// Lists a stage's items for another thread: those `pick` keeps (given each one's position), in
/// batches of `size` handed to `send` (one hand-off, a wake-up of the other thread, per batch
/// rather than per item). Returns how the listing ended and the last batch, not yet sent.
fn each_item_batched<T>(
    stage: &dyn Stage,
    input: &StageInput,
    size: usize,
    mut pick: impl FnMut(usize, Item) -> Option<T>,
    mut send: impl FnMut(Vec<T>) -> Result<(), StageError>,
) -> (Result<(), StageError>, Vec<T>) {
    let (mut at, mut batch) = (0, Vec::with_capacity(size));
    let listed = stage.each_item(input, &mut |item| {
        at += 1;
        batch.extend(pick(at - 1, item));
        if batch.len() < size {
            return Ok(());
        }
        send(std::mem::replace(&mut batch, Vec::with_capacity(size)))
    });
    (listed, batch)
}

/// A streamed stage's output, written into the store as the stage assembles it from its items
/// (listed again) and their results (read back one at a time), or, when its output holds the
/// results as they are, from the results alone. The outer error is the store's.
fn write_streamed(stage: &dyn Stage, input: &StageInput, store: &Store, keys: &[Digest], spans: &[Span]) -> Result<Result<Digest, StageError>, StoreError> {
    let mut failed = None;
    let written = store.put_object_streamed(|w| {
        let (result, out) = if stage.output_holds_results() { write_results(stage, input, store, keys, spans, w) } else { write_listed(stage, input, store, keys, w) };
        if let Some(e) = out {
            return Err(e);
        }
        match result {
            Ok(()) => Ok(true),
            Err(e) => {
                failed = Some(e);
                Ok(false)
            }
        }
    })?;
    Ok(match failed {
        Some(e) => Err(e),
        None => Ok(written.expect("kept when the stage succeeded")),
    })
}

/// The stage's output from its items listed again, each with its result parsed. Returns how the
/// stage did and the write that failed, if one did.
fn write_listed(stage: &dyn Stage, input: &StageInput, store: &Store, keys: &[Digest], w: &mut dyn std::io::Write) -> (Result<(), StageError>, Option<std::io::Error>) {
    let mut out = OutputWriter::new(w);
    let result = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Item>>(4);
        let lister = scope.spawn(move || {
            let send = |batch| tx.send(batch).map_err(|_| StageError::new("stopped"));
            let (listed, rest) = each_item_batched(stage, input, STREAMED_BATCH, |_, item| Some(item), send);
            listed?;
            if rest.is_empty() { Ok(()) } else { send(rest) }
        });
        let mut k = 0;
        let reader = store.item_reader();
        let mut results = rx.iter().flatten().map(|item| {
            let key = keys.get(k).ok_or_else(|| StageError::new("the stage listed more items than it ran"))?;
            k += 1;
            let value = reader.get(key).ok_or_else(|| StageError::new(format!("item `{}` vanished from the store while the stage ran", item.id)))?;
            Ok((item, value))
        });
        let written = stage.write_output(input, &mut results, &mut out);
        drop(results);
        let listed = lister.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        written?;
        listed?;
        if k != keys.len() { Err(StageError::new("the stage listed fewer items than it ran")) } else { Ok(()) }
    });
    finish_output(out, result)
}

/// The output of a stage that [`Stage::output_holds_results`]: each result's canonical bytes as
/// the store keeps them, in item order, a chunk at a time (as listed). A chunk not kept whole is
/// read item by item, then kept whole for the next time.
fn write_results(stage: &dyn Stage, input: &StageInput, store: &Store, keys: &[Digest], spans: &[Span], w: &mut dyn std::io::Write) -> (Result<(), StageError>, Option<std::io::Error>) {
    let reader = store.item_reader();
    let mut spans = spans.iter().scan(0, |start, span| Some((std::mem::replace(start, span.end)..span.end, span)));
    let mut ready = Vec::new().into_iter();
    let mut results = std::iter::from_fn(|| {
        loop {
            if let Some(next) = ready.next() {
                return Some(Ok(next));
            }
            let (span, listed) = spans.next()?;
            let key = listed.results;
            let chunk = match reader.get_chunk(&key, span.len()) {
                Some(chunk) => chunk,
                None if listed.stand_ins => {
                    let e = format!("a chunk of {} results (key {}) vanished from the store while the stage ran; run again", span.len(), key.short());
                    return Some(Err(StageError::new(e)));
                }
                None => {
                    let mut chunk = Vec::with_capacity(span.len());
                    for k in span {
                        match reader.get_canonical(&keys[k]) {
                            Some(bytes) => chunk.push(bytes),
                            None => {
                                let e = format!("result {} of {} (memo key {}) vanished from the store while the stage ran", k + 1, keys.len(), keys[k].short());
                                return Some(Err(StageError::new(e)));
                            }
                        }
                    }
                    // Only saves reading them one by one next time: not kept, they still are.
                    if let Err(e) = store.put_chunk(&key, &chunk) {
                        tracing::debug!("a chunk of {} results could not be kept whole: {e}", chunk.len());
                    }
                    chunk
                }
            };
            ready = chunk.into_iter();
        }
    });
    let mut out = OutputWriter::with_results(w, &mut results);
    let mut result = stage.write_output(input, &mut std::iter::empty(), &mut out);
    if result.is_ok() && !out.results_written() {
        result = Err(StageError::new("the stage's output holds its results but it did not write them"));
    }
    finish_output(out, result)
}

fn finish_output(mut out: OutputWriter, result: Result<(), StageError>) -> (Result<(), StageError>, Option<std::io::Error>) {
    if let Some(e) = out.failed.take() {
        return (result, Some(e));
    }
    match result {
        Ok(()) => match out.finish() {
            Ok(()) => (Ok(()), None),
            Err(e) => (Ok(()), Some(e)),
        },
        Err(e) => (Err(e), None),
    }
}

fn check_locked_output(ctx: &Ctx, iteration: u32, node: &crate::config::StageNode, output: &Outputs) -> Result<(), StageFail> {
    let id = &node.id;
    match ctx.locked.as_ref().and_then(|l| l.stage(id, iteration)) {
        Some(locked) if locked.output != output.stable => {
            // What the stage names from its output (a trained model's files) shows where it parted.
            let here = node.stage.output_pins(&|| ctx.store.get_object(&output.full));
            let differ = pin_differences(&here, &locked.pins);
            Err(StageFail::Fatal(RunError::LockMismatch(format!(
                "stage `{id}` (iteration {}) produced {} but the lockfile records {}: the stage is not reproducible{}",
                iteration + 1,
                output.stable.short(),
                locked.output.short(),
                if differ.is_empty() { String::new() } else { format!(" ({})", differ.join("; ")) }
            ))))
        }
        _ => Ok(()),
    }
}

/// Each pin of `here` whose locked value differs, `thing: name VALUE here, VALUE locked` (the thing
/// named once for its pins in a row); digests shortened, at most four and a count of the rest.
fn pin_differences(here: &crate::stage::Pins, locked: &crate::stage::Pins) -> Vec<String> {
    let short = |v: &str| if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) { v[..12].to_string() } else { v.to_string() };
    let mut differ = Vec::new();
    for (thing, names) in here {
        let mut first = true;
        for (name, value) in names {
            let was = locked.get(thing).and_then(|names| names.get(name));
            if was != Some(value) {
                let whose = if std::mem::take(&mut first) { format!("{thing}: ") } else { String::new() };
                differ.push(format!("{whose}{name} {} here, {} locked", short(value), was.map_or("none".to_string(), |w| short(w))));
            }
        }
    }
    if differ.len() > 4 {
        let more = differ.len() - 4;
        differ.truncate(4);
        differ.push(format!("and {more} more"));
    }
    differ
}

/// `value` with every object key in `keys` removed, at any depth.
fn without_keys(value: &Value, keys: &[&str]) -> Value {
    match value {
        Value::Object(map) => Value::Object(map.iter().filter(|(k, _)| !keys.contains(&k.as_str())).map(|(k, v)| (k.clone(), without_keys(v, keys))).collect()),
        Value::Array(items) => Value::Array(items.iter().map(|v| without_keys(v, keys)).collect()),
        other => other.clone(),
    }
}
