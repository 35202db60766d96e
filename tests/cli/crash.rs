//! Kill -9 anywhere: a run of the quality loop on the real model (inference, judge, clusters, a
//! revision, a second iteration) is killed at random moments and in the middle of store writes,
//! again and again, each run continuing from what the last one left. It must end with the
//! lockfile byte for byte the one an uninterrupted run writes, without ever computing again an item
//! that had finished, or computing one twice.

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Project, loop_stages, pipeline, text};


fn project() -> Project {
    let p = Project::new();
    p.keep_tickets(8);
    p.write("select.toml", &(p.read("select.toml") + &loop_stages(false, "max_iterations = 2")));
    p
}

/// The items a run's event log says finished, as `stage/item@iteration`.
fn finished(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        // A kill can cut the last line short.
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "item")
        .map(|e| format!("{}/{}@{}", e["stage"].as_str().unwrap(), e["item"].as_str().unwrap(), e["iteration"]))
        .collect()
}

/// A small deterministic generator for the kill times (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

enum Kill {
    /// SIGKILL this long after the start.
    After(Duration),
    /// Abort halfway through the process's Nth store write (`PIPELINE_CRASH_AT_WRITE`).
    AtWrite(u64),
}

/// Runs `select.toml` in `p` and kills it as `kill` says; true if it was killed before it finished.
fn run_and_kill(p: &Project, log: &std::path::Path, kill: &Kill) -> bool {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    cmd.args(["run", "select.toml", "--events", log.to_str().unwrap()]).current_dir(&p.dir).env_remove("PIPELINE_STORE").stdout(Stdio::null()).stderr(Stdio::null());
    let status = match kill {
        Kill::After(t) => {
            let mut child = cmd.spawn().unwrap();
            let start = Instant::now();
            while start.elapsed() < *t && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            child.wait().unwrap()
        }
        Kill::AtWrite(w) => cmd.env("PIPELINE_CRASH_AT_WRITE", w.to_string()).status().unwrap(),
    };
    status.signal().is_some()
}

/// Chains of killed runs, each continuing from what the last one left, until a run finishes; at
/// least 20 kills in all, alternating SIGKILL at a random moment and an abort in the middle of a
/// random store write. After each kill: no item that had finished is computed again, none twice;
/// at the end of each chain: the lockfile of an uninterrupted run, byte for byte.
#[test]
fn kill_9_anywhere_loses_nothing_and_redoes_nothing() {
    let reference = project();
    let out = reference.run(&["run", "select.toml", "--events", reference.path("events.jsonl").to_str().unwrap()]);
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let lock = reference.read("select.lock");
    let all_items: BTreeSet<String> = finished(&reference.path("events.jsonl")).into_iter().collect();
    assert!(all_items.iter().any(|i| i.ends_with("@1")), "the loop ran a second iteration: {all_items:?}");

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut kills, mut chains, mut step) = (0, 0, 0);
    while kills < 20 {
        chains += 1;
        let p = project();
        let mut done: Vec<String> = Vec::new();
        loop {
            step += 1;
            let kill = if step % 2 == 0 { Kill::After(Duration::from_secs_f64(0.3 + 2.5 * rng.next())) } else { Kill::AtWrite(1 + (rng.next() * 12.0) as u64) };
            let what = match &kill {
                Kill::After(t) => format!("SIGKILL after {:.2} s", t.as_secs_f64()),
                Kill::AtWrite(w) => format!("abort in store write {w}"),
            };
            let log = p.path(&format!("events-{step}.jsonl"));
            let killed = run_and_kill(&p, &log, &kill);
            let now = finished(&log);
            let redone: Vec<&String> = now.iter().filter(|i| done.contains(i)).collect();
            assert!(redone.is_empty(), "step {step} ({what}): finished items computed again: {redone:?}");
            let unique: BTreeSet<&String> = now.iter().collect();
            assert_eq!(unique.len(), now.len(), "step {step} ({what}): an item computed twice: {now:?}");
            let unknown: Vec<&String> = now.iter().filter(|i| !all_items.contains(*i)).collect();
            assert!(unknown.is_empty(), "step {step} ({what}): items an uninterrupted run does not have: {unknown:?}");
            done.extend(now.iter().cloned());
            println!("chain {chains} step {step}: {what}: {}; {} item(s) finished, {} of {} in all", if killed { "killed" } else { "finished" }, now.len(), done.len(), all_items.len());
            if !killed {
                break;
            }
            kills += 1;
            assert!(!p.path("select.lock").exists(), "step {step}: a killed run wrote the lockfile");
        }
        assert_eq!(p.read("select.lock"), lock, "chain {chains}: the lockfile differs from the uninterrupted run's");
        let plan = text(&p.run(&["plan", "select.toml"]).stdout);
        assert!(!plan.contains("dirty") && !plan.contains("pending"), "chain {chains}: {plan}");
        // An item whose memo was written just before the kill, but not its event, is not in any
        // log; it was not computed again either (it would be in the next log).
        println!("chain {chains}: lockfile identical; {} item(s) finished just before a kill, unlogged and not recomputed", all_items.len() - done.len());
    }
    println!("{kills} kills in {chains} chain(s), {step} runs: nothing lost, nothing computed twice");
}

/// A project of `n` generated samples through `dataset -> prompt -> render`: enough items for
/// `render` to train its compression dictionary in the store (after 2,000 values).
fn many_samples(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let data: String = (0..n)
        .map(|i| format!("{{\"id\":\"r{i:05}\",\"text\":\"reading {i}: the pressure was {} and the valve {}\",\"label\":\"{}\"}}\n", i * 7919 % 10007, ["open", "shut"][i % 2], ["ok", "check"][i % 3 / 2]))
        .collect();
    std::fs::write(dir.path().join("data.jsonl"), data).unwrap();
    std::fs::write(dir.path().join("sample.j2"), "Is this reading ok or does it need a check?\n\n{{ text }}\n").unwrap();
    std::fs::write(
        dir.path().join("scale.toml"),
        "seed = 1\n[stages.samples]\nkind = \"dataset\"\npath = \"data.jsonl\"\nlabel = \"label\"\n[stages.prompt]\nkind = \"prompt\"\ntemplate = \"sample.j2\"\n\
         [stages.rendered]\nkind = \"render\"\nneeds = [\"samples\", \"prompt\"]\n",
    )
    .unwrap();
    dir
}

/// Aborts in the middle of store writes while `render` memoizes 6,000 items and trains its
/// dictionary (which goes into the store in the same transaction as the first value compressed
/// with it): each run continues from what the last left, no finished item is computed again, and
/// the last run writes the lockfile of an uninterrupted one, its items read back through the
/// dictionary.
#[test]
fn a_kill_while_items_train_their_dictionary_loses_nothing() {
    let reference = many_samples(6000);
    let out = pipeline(reference.path(), &["run", "scale.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lock = std::fs::read_to_string(reference.path().join("scale.lock")).unwrap();

    let p = many_samples(6000);
    let mut done: Vec<String> = Vec::new();
    let mut kills = 0;
    for step in 1.. {
        let log = p.path().join(format!("events-{step}.jsonl"));
        let status = Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["run", "scale.toml", "--events", log.to_str().unwrap()])
            .current_dir(p.path())
            .env_remove("PIPELINE_STORE")
            .env("PIPELINE_CRASH_AT_WRITE", (6 + 2 * step).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        let now = finished(&log);
        let redone: Vec<&String> = now.iter().filter(|i| done.contains(i)).collect();
        assert!(redone.is_empty(), "run {step}: finished items computed again: {redone:?}");
        println!("run {step}: {} item(s) finished, {} in all", now.len(), done.len() + now.len());
        done.extend(now);
        if status.signal().is_none() {
            assert!(status.success(), "run {step} failed");
            break;
        }
        kills += 1;
        assert!(step < 60, "60 runs and still not done ({} items)", done.len());
    }
    assert!(kills >= 3, "only {kills} kill(s): the items were not interrupted");
    assert_eq!(std::fs::read_to_string(p.path().join("scale.lock")).unwrap(), lock, "the lockfile differs from the uninterrupted run's");
    let db = rusqlite::Connection::open(p.path().join(".pipeline/items.db")).unwrap();
    let dicts: i64 = db.query_row("SELECT count(*) FROM dicts", [], |r| r.get(0)).unwrap();
    let compressed: i64 = db.query_row("SELECT count(*) FROM items WHERE substr(value, 1, 4) = x'28b52ffd'", [], |r| r.get(0)).unwrap();
    assert_eq!(dicts, 1, "render's items share one dictionary");
    assert!(compressed >= 3000, "{compressed} of 6000 items compressed");
    // Read back through the dictionary: the rendered output again, from the memo alone.
    std::fs::remove_dir_all(p.path().join(".pipeline/done")).unwrap();
    let out = pipeline(p.path(), &["run", "--locked", "scale.toml", "--events", p.path().join("again.jsonl").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(finished(&p.path().join("again.jsonl")).is_empty(), "every item read back from the store, none computed");
}
