//! One stage's execution: fresh from the store, or its items run (memoized one by one) and its
//! output assembled, stored and checked against the lockfile.

use super::*;

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
        check_locked_output(ctx, iteration, &node.id, &output)?;
        return Ok(StageDone { fingerprint: fp, stable_inputs, output, executed: false, items_run: 0, items_cached: 0 });
    }
    let reasons = dirty_reasons(&fp, previous.as_ref());

    let values = load_inputs(&ctx.store, &inputs).map_err(StageFail::Error)?;
    let input = Arc::new(stage_input(pipeline, &ctx.files, i, values, Cancel(ctx.cancel.clone())));
    let items = node.stage.items(&input).map_err(|e| StageFail::Error(e.message))?;
    let keys: Vec<Digest> = items.iter().map(|it| fp.item_key(&it.input)).collect();
    let mut outputs: Vec<Option<Value>> = keys.iter().map(|k| ctx.store.get_item(k)).collect();
    let cached = outputs.iter().filter(|o| o.is_some()).count();
    let mut groups: Vec<ItemGroup> = Vec::new();
    for (item, output) in items.iter().zip(&outputs) {
        let Some(name) = item_group(&item.id) else { continue };
        let at = match groups.iter().position(|g| g.name == name) {
            Some(at) => at,
            None => {
                groups.push(ItemGroup { name: name.to_string(), items: 0, cached_items: 0 });
                groups.len() - 1
            }
        };
        groups[at].items += 1;
        groups[at].cached_items += usize::from(output.is_some());
    }
    ctx.emit(Event::Started { iteration, stage: node.id.clone(), reasons, items: items.len(), cached_items: cached, groups });

    let items = Arc::new(items);
    let mut pending = (0..items.len()).filter(|&k| outputs[k].is_none()).collect::<Vec<_>>().into_iter();
    let limit = node.stage.item_concurrency().max(1);
    let mut running: JoinSet<(usize, Result<Value, crate::stage::StageError>)> = JoinSet::new();
    // A failed item does not stop the others: everything that succeeds is kept, and a rerun
    // retries only what failed. Failures in a row (a server down, a systematic bug) stop the
    // stage early instead of failing every item one by one.
    let give_up_after = limit.max(5);
    let (mut failures, mut failed_in_a_row) = (Vec::<String>::new(), 0);
    let mut interrupted = false;
    let mut ran = 0;
    loop {
        while running.len() < limit && failed_in_a_row < give_up_after {
            if ctx.cancel.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            let Some(k) = pending.next() else { break };
            let (stage, items, cx) = (node.stage.clone(), items.clone(), ItemContext {
                seed: pipeline.seed,
                cancel: Cancel(ctx.cancel.clone()),
                progress: ItemProgress(Some((ctx.observer.clone(), iteration, node.id.clone(), items[k].id.clone()))),
            });
            running.spawn(async move { (k, stage.run_item(&items[k], &cx).await) });
        }
        let Some(joined) = running.join_next().await else { break };
        let (k, result) = match joined {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        match result {
            Ok(value) => {
                // Memoize at once: a kill after this point never loses the item.
                ctx.store.put_item(&keys[k], &value)?;
                ran += 1;
                ctx.emit(Event::Item { iteration, stage: node.id.clone(), item: items[k].id.clone() });
                outputs[k] = Some(value);
                failed_in_a_row = 0;
            }
            Err(e) => {
                tracing::warn!(stage = node.id, item = items[k].id, "item failed: {}", e.message);
                failures.push(format!("item `{}`: {}", items[k].id, e.message));
                failed_in_a_row += 1;
            }
        }
    }
    if let Some(first) = failures.first() {
        let n = failures.len();
        return Err(StageFail::Error(if failed_in_a_row >= give_up_after {
            format!("stopped after {failed_in_a_row} items failed in a row ({} not started); finished items are kept. First: {first}", pending.len())
        } else if n == 1 {
            first.clone()
        } else {
            format!("{n} items failed; finished items are kept and a rerun retries only the failed ones. First: {first}")
        }));
    }
    if interrupted {
        return Err(StageFail::Interrupted);
    }
    let results: Vec<(Item, Value)> = items.iter().cloned().zip(outputs.into_iter().map(|o| o.expect("every item computed"))).collect();
    let stage = node.stage.clone();
    let finish_input = input.clone();
    let value = tokio::task::spawn_blocking(move || stage.finish(&finish_input, results))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(|e| StageFail::Error(e.message))?;
    let full = ctx.store.put_object(&value)?;
    let volatile = node.stage.volatile_keys();
    let stable = if volatile.is_empty() { full } else { Digest::of_json(&without_keys(&value, volatile)) };
    let output = Outputs { full, stable };
    ctx.store.put_done(&digest, &output)?;
    let unchanged = previous.as_ref().is_some_and(|r| r.output == full);
    ctx.store.put_record(&pipeline.name, &node.id, &Record { fingerprint: fp.clone(), output: full })?;
    ctx.emit(Event::Finished { iteration, stage: node.id.clone(), output: full, unchanged });
    check_locked_output(ctx, iteration, &node.id, &output)?;
    Ok(StageDone { fingerprint: fp, stable_inputs, output, executed: true, items_run: ran, items_cached: cached })
}

fn check_locked_output(ctx: &Ctx, iteration: u32, id: &str, output: &Outputs) -> Result<(), StageFail> {
    match ctx.locked.as_ref().and_then(|l| l.stage(id, iteration)) {
        Some(locked) if locked.output != output.stable => Err(StageFail::Fatal(RunError::LockMismatch(format!(
            "stage `{id}` (iteration {}) produced {} but the lockfile records {}: the stage is not reproducible",
            iteration + 1,
            output.stable.short(),
            locked.output.short()
        )))),
        _ => Ok(()),
    }
}

/// `value` with every object key in `keys` removed, at any depth.
fn without_keys(value: &Value, keys: &[&str]) -> Value {
    match value {
        Value::Object(map) => Value::Object(map.iter().filter(|(k, _)| !keys.contains(&k.as_str())).map(|(k, v)| (k.clone(), without_keys(v, keys))).collect()),
        Value::Array(items) => Value::Array(items.iter().map(|v| without_keys(v, keys)).collect()),
        other => other.clone(),
    }
}
