//! Bad conditions at run time: a disk that fills up mid-run, a read-only store, model weights
//! whose sha256 does not match the catalog. Each: a clear error naming the file, exit code ≠ 0,
//! no panic, the previous lockfile untouched, and a store the next run continues from without
//! redoing finished work.
//!
//! The full disk and the read-only store are real: a 160 KiB tmpfs and a read-only bind mount, in
//! a private mount namespace (`unshare -rm`, no root needed where user namespaces are enabled).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::{Project, items, text};

/// `script` in `sh` inside a new user and mount namespace, in `dir`, with `$PIPELINE` set.
fn in_namespace(dir: &Path, script: &str) -> Output {
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", script])
        .current_dir(dir)
        .env("PIPELINE", env!("CARGO_BIN_EXE_pipeline"))
        .env("NO_COLOR", "1")
        .env_remove("PIPELINE_STORE")
        .output()
        .expect("unshare (util-linux) runs");
    assert!(!text(&out.stderr).contains("unshare failed"), "this machine does not allow user namespaces: {}", text(&out.stderr));
    out
}

fn no_panic(out: &Output) {
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(!all.contains("panicked") && !all.contains("RUST_BACKTRACE"), "{all}");
}

/// Every template change re-renders all 240 tickets: enough writes to fill a small disk.
fn change_template(p: &Project) {
    p.write("prompts/classify.j2", &(p.read("prompts/classify.j2") + "\n"));
}

#[test]
fn a_full_disk_fails_cleanly_and_the_next_run_continues() {
    let p = Project::new();
    let out = p.run(&["run", "select.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lock = p.read("select.lock");
    change_template(&p);
    std::fs::create_dir(p.path("small")).unwrap();
    // The store on a 160 KiB disk, seeded with everything the first run stored that fits... none:
    // a fresh store there, so dataset, prompt and the first rendered items fill it.
    let out = in_namespace(
        &p.dir,
        r#"mount -t tmpfs -o size=160k tmpfs small || exit 99
$PIPELINE run select.toml --store small/store --events events.jsonl; echo "exit $?" > exit.txt
cp -a small/store full-store"#,
    );
    no_panic(&out);
    assert_eq!(p.read("exit.txt").trim(), "exit 3", "{}\n{}", text(&out.stdout), text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("No space left on device") && err.contains("small/store/"), "the error names the file and the cause: {err}");
    assert!(err.contains("the next run continues from there"), "the error says how to go on: {err}");
    assert_eq!(p.read("select.lock"), lock, "the previous lockfile is untouched");
    let finished: BTreeSet<String> = items(&std::fs::read_to_string(p.path("events.jsonl")).unwrap().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect::<Vec<_>>()).into_iter().collect();
    assert!(!finished.is_empty(), "some items finished before the disk was full");
    // Nothing half-written: no temporary file left, the item database whole, every item parses.
    let store = p.path("full-store");
    assert!(std::fs::read_dir(store.join("tmp")).map_or(true, |mut d| d.next().is_none()), "a temporary file was left behind");
    let db = rusqlite::Connection::open(store.join("items.db")).unwrap();
    assert_eq!(db.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)).unwrap(), "ok");
    let values: Vec<Vec<u8>> = db.prepare("SELECT value FROM items").unwrap().query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
    assert!(!values.is_empty(), "the finished items are in the database");
    for value in &values {
        serde_json::from_slice::<Value>(value).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(value)));
    }
    drop(db);
    // With room again, the run continues: finished items are not rendered again.
    let log = p.path("again.jsonl");
    let out = p.run(&["run", "select.toml", "--store", store.to_str().unwrap(), "--events", log.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again: Vec<String> = items(&std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<_>>());
    assert_eq!(again.len() + finished.len(), 240, "every item once: {} before, {} now", finished.len(), again.len());
    assert!(again.iter().all(|i| !finished.contains(i)), "a finished item was rendered again");
    println!("full disk: {} items finished before ENOSPC, {} after; nothing redone", finished.len(), again.len());
}

#[test]
fn a_read_only_store_is_refused_and_left_as_it_was() {
    let p = Project::new();
    let out = p.run(&["run", "select.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lock = p.read("select.lock");
    let before = crate::review::tree(&p.path(".pipeline"));
    change_template(&p);
    let out = in_namespace(&p.dir, "mount --bind .pipeline .pipeline && mount -o remount,bind,ro .pipeline || exit 99\n$PIPELINE run select.toml");
    no_panic(&out);
    assert_eq!(out.status.code(), Some(3), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("Read-only file system") && err.contains(".pipeline"), "{err}");
    assert_eq!(p.read("select.lock"), lock, "the previous lockfile is untouched");
    assert_eq!(crate::review::tree(&p.path(".pipeline")), before, "the store is as it was");
}

#[test]
fn weights_whose_sha256_does_not_match_are_refused() {
    let p = Project::new();
    let out = p.run(&["run", "select.toml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lock = p.read("select.lock");
    // A catalog whose model file is not the file its digest names (one byte differs).
    let real = crate::http::smollm2();
    let mut bytes = std::fs::read(&real).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(p.path("tampered.gguf"), &bytes).unwrap();
    let catalog = std::fs::read_to_string(p.dir.join("../catalogs/open-models.toml")).unwrap();
    let sha = catalog.split("sha256 = \"").nth(1).unwrap().split('"').next().unwrap();
    p.write(
        "tampered.toml",
        &format!(
            "[[model]]\nid = \"tampered\"\nfamily = \"SmolLM2\"\ndeveloper = \"Hugging Face\"\norigin = \"US\"\nparams_total_b = 0.135\nparams_active_b = 0.135\nlicense = \"Apache-2.0\"\n\n[[model.source]]\nkind = \"local_file\"\npath = \"tampered.gguf\"\nsha256 = \"{sha}\"\nformat = \"gguf\"\n"
        ),
    );
    p.write("select.toml", &(p.read("select.toml") + "\n[stages.answers]\nkind = \"infer\"\nneeds = [\"rendered\"]\ncatalog = \"tampered.toml\"\nmodels = [\"tampered\"]\n"));
    p.keep_tickets(3);
    let out = p.run(&["run", "select.toml"]);
    no_panic(&out);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let all = text(&out.stdout) + &text(&out.stderr);
    assert!(all.contains("sha256 mismatch") && all.contains("tampered.gguf") && all.contains(sha), "{all}");
    assert_eq!(p.read("select.lock"), lock, "the previous lockfile is untouched");
    let plan = text(&p.run(&["plan", "select.toml"]).stdout);
    assert!(plan.contains("answers") && !plan.contains("fresh    answers"), "no result was recorded for the failed stage: {plan}");
}
