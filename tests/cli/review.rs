//! `pipeline review` as a person uses it: a real run of the rubric pipeline on SmolLM2, the review
//! page in headless Chromium, labels given by mouse and keyboard, and the next run measuring the
//! judge against them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::browser::Browser;
use crate::{Project, items, started, text};

const MODEL: &str = "smollm2-135m-instruct";

/// Every file under `dir` with its bytes.
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

/// One raw HTTP/1.1 request (the path sent exactly as written); the whole response.
fn raw(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn labels(p: &Project) -> Vec<Value> {
    p.read("labels/qa.jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn review_page_labels_traces_in_chromium_and_the_judge_is_measured_against_them() {
    let p = Project::new();
    let keep = ["t001", "t002", "t011", "t014", "t024", "t028"];
    let filter = |file: &str, ids: &[&str]| -> String { p.read(file).lines().filter(|l| ids.iter().any(|k| l.contains(&format!("\"id\": \"{k}\"")))).map(|l| format!("{l}\n")).collect() };
    let (data, labeled) = (filter("data/trivia.jsonl", &keep), filter("labels/qa.jsonl", &keep[..2]));
    p.write("data/trivia.jsonl", &data);
    p.write("labels/qa.jsonl", &labeled);

    let out = p.run(&["review", "qa.toml"]);
    assert_eq!(out.status.code(), Some(3), "nothing to review before a run");
    assert!(text(&out.stderr).contains("has not been run yet"), "{}", text(&out.stderr));

    let (code, _, out) = p.run_logged_on("qa.toml", &[]);
    assert_eq!(code, 0, "{}", text(&out.stderr));
    let judge: Value = serde_json::from_slice(&p.run(&["show", "qa.toml", "judge"]).stdout).unwrap();
    let verdicts = judge["models"][MODEL]["verdicts"].as_array().unwrap().clone();
    let answer_of = |id: &str| verdicts.iter().find(|v| v["id"] == id).unwrap()["answer"].clone();
    assert_eq!(judge["agreement"]["labels"], 2);
    let store = tree(&p.path(".pipeline"));

    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_pipeline"))
            .args(["review", "qa.toml", "--json"])
            .current_dir(&p.dir)
            .env_remove("PIPELINE_STORE")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    BufReader::new(server.0.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let started_with: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    let url = started_with["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "loopback only: {url}");
    assert_eq!(started_with["traces"], 6);
    let port: u16 = url.trim_start_matches("http://127.0.0.1:").trim_end_matches('/').parse().unwrap();

    // Nothing but the page and its API: no file is served, whatever the path says.
    for path in ["/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/qa.toml", "/labels/qa.jsonl", "/.pipeline/runs", "/api/../qa.toml", "//etc/passwd"] {
        let r = raw(port, &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"));
        assert!(r.starts_with("HTTP/1.1 404") || r.starts_with("HTTP/1.1 400"), "{path}: {r}");
        assert!(!r.contains("root:") && !r.contains("[stages") && !r.contains("\"pass\""), "{path} read a file: {r}");
    }
    // Another host name (a page elsewhere rebinding its name to 127.0.0.1) gets nothing.
    let r = raw(port, &format!("GET /api/traces HTTP/1.1\r\nHost: attacker.example:{port}\r\nConnection: close\r\n\r\n"));
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // A label posted from another origin, or as a form, is refused and writes nothing.
    let body = format!("{{\"id\": \"t011\", \"model\": \"{MODEL}\", \"pass\": true}}");
    for (headers, status) in [
        ("Origin: http://attacker.example\r\nContent-Type: application/json\r\n", "403"),
        ("Sec-Fetch-Site: cross-site\r\nContent-Type: application/json\r\n", "403"),
        ("Content-Type: text/plain\r\n", "415"),
    ] {
        let r = raw(port, &format!("POST /api/label HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()));
        assert!(r.starts_with(&format!("HTTP/1.1 {status}")), "{headers}: {r}");
    }
    assert_eq!(p.read("labels/qa.jsonl"), labeled);

    let mut b = Browser::launch();
    b.goto(&url);
    b.wait_for("document.body.dataset.ready === '1'");
    assert_eq!(b.eval("document.getElementById('progress').textContent"), "2 / 6 labeled");
    assert_eq!(b.eval("document.querySelectorAll('#list li').length"), 6);

    // Click a trace, write a note, click "Fail".
    b.click("#list li[data-id='t011']");
    b.wait_for("document.getElementById('trace').textContent.includes('t011')");
    assert_eq!(b.eval("document.getElementById('answer').textContent"), answer_of("t011"));
    b.click("#note");
    b.type_text("names a person, not a number");
    // Leave the note, file the fail under the rubric's third failure mode (`3`), click "Fail".
    b.press("Escape");
    b.press("3");
    assert_eq!(b.eval("document.getElementById('mode').value"), "wrong_fact");
    b.click("#fail");
    b.wait_for("document.getElementById('progress').textContent === '3 / 6 labeled'");
    let saved = labels(&p);
    assert_eq!(saved.len(), 3);
    assert_eq!(&saved[..2], &labeled.lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<Value>>()[..], "earlier labels stay as they were");
    assert_eq!(saved[2], serde_json::json!({"id": "t011", "model": MODEL, "answer": answer_of("t011"), "pass": false, "failure_mode": "wrong_fact", "note": "names a person, not a number"}));
    // The page moved on to the next unlabeled trace.
    assert_ne!(b.eval("document.querySelector('#list li.current').dataset.id"), "t011");

    // After a reload the label and its note are still there.
    b.reload();
    b.wait_for("document.body.dataset.ready === '1'");
    assert_eq!(b.eval("document.getElementById('progress').textContent"), "3 / 6 labeled");
    b.click("#list li[data-id='t011']");
    b.wait_for("document.getElementById('trace').textContent.includes('t011')");
    assert_eq!(b.eval("document.getElementById('fail').classList.contains('on')"), true);
    assert_eq!(b.eval("document.getElementById('pass').classList.contains('on')"), false);
    assert_eq!(b.eval("document.getElementById('note').value"), "names a person, not a number");

    // By keyboard: `u` goes to the next unlabeled trace, `p` passes it.
    b.press("u");
    let next = b.wait_for("(c => c && c.dataset.id !== 't011' && c.dataset.id)(document.querySelector('#list li.current'))");
    let next = next.as_str().unwrap().to_string();
    assert!(!labeled.contains(&format!("\"{next}\"")), "{next} was labeled already");
    b.press("p");
    b.wait_for("document.getElementById('progress').textContent === '4 / 6 labeled'");
    let saved = labels(&p);
    assert_eq!(saved.len(), 4);
    assert_eq!((saved[3]["id"].as_str().unwrap(), &saved[3]["pass"]), (next.as_str(), &Value::Bool(true)));
    // Changing a label rewrites its line in place: still one line per answer.
    b.click("#list li[data-id='t011']");
    b.wait_for("document.getElementById('trace').textContent.includes('t011')");
    b.press("p");
    b.wait_for("document.querySelector('#list li[data-id=\"t011\"] .tag:last-child').textContent === 'you pass'");
    let saved = labels(&p);
    assert_eq!(saved.len(), 4);
    assert_eq!((&saved[2]["id"], &saved[2]["pass"], &saved[2]["note"]), (&Value::from("t011"), &Value::Bool(true), &Value::from("names a person, not a number")));

    // Filters: the judge's failures only, then the unlabeled ones.
    let judge_fails = verdicts.iter().filter(|v| v["pass"] == false).count();
    b.eval("(s => { s.value = 'fail'; s.dispatchEvent(new Event('change')); })(document.getElementById('f-verdict'))");
    assert_eq!(b.eval("document.querySelectorAll('#list li').length"), judge_fails);
    b.eval("(s => { s.value = ''; s.dispatchEvent(new Event('change')); })(document.getElementById('f-verdict'))");
    b.eval("(s => { s.value = 'unlabeled'; s.dispatchEvent(new Event('change')); })(document.getElementById('f-label'))");
    assert_eq!(b.eval("document.querySelectorAll('#list li').length"), 2);
    assert_eq!(b.eval("document.getElementById('progress').textContent"), "4 / 6 labeled · 2 shown, 0 labeled");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("review.png");
    b.screenshot(&shot);
    // The progress bar's blue (#3465a4) is on screen: the page was painted.
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let blue = buf[..info.buffer_size()].chunks(info.color_type.samples()).filter(|p| p[..3] == [0x34, 0x65, 0xa4]).count();
    assert!(blue > 200, "{blue} progress-bar pixels in {}", shot.display());
    println!("review page screenshot: {}", shot.display());
    drop(b);

    // Ctrl-C stops the server cleanly; the run's own artifacts were only read.
    Command::new("kill").args(["-INT", &server.0.id().to_string()]).status().unwrap();
    assert!(server.0.wait().unwrap().success());
    assert_eq!(tree(&p.path(".pipeline")), store, "reviewing changed the store");

    // The next run reads the new labels: agreement over 4, and no answer is judged again.
    let (code, events, _) = p.run_logged_on("qa.toml", &[]);
    assert_eq!(code, 0);
    assert_eq!(started(&events), ["judge", "decision"]);
    assert!(items(&events).is_empty(), "{:?}", items(&events));
    let judge: Value = serde_json::from_slice(&p.run(&["show", "qa.toml", "judge"]).stdout).unwrap();
    assert_eq!(judge["agreement"]["labels"], 4);
    let humans: Vec<(&str, bool)> = judge["models"][MODEL]["verdicts"].as_array().unwrap().iter().filter_map(|v| Some((v["id"].as_str()?, v["human"].as_bool()?))).collect();
    assert!(humans.contains(&("t011", true)) && humans.contains(&(next.as_str(), true)), "{humans:?}");

    // Labels as worked examples: the judge is shown up to 2 labeled dev-split answers, so every
    // answer is judged again, and those labels leave the agreement figures.
    p.write("qa.toml", &p.read("qa.toml").replace("labels = \"labels/qa.jsonl\"", "labels = \"labels/qa.jsonl\"\nlabel_examples = 2"));
    let (code, events, _) = p.run_logged_on("qa.toml", &[]);
    assert_eq!(code, 0);
    assert_eq!(items(&events).iter().filter(|i| i.starts_with("judge/")).count(), 6);
    let judge: Value = serde_json::from_slice(&p.run(&["show", "qa.toml", "judge"]).stdout).unwrap();
    let verdicts = judge["models"][MODEL]["verdicts"].as_array().unwrap();
    let dev_labeled = verdicts.iter().filter(|v| v["split"] == "dev" && v["human"].is_boolean()).count();
    let shown: Vec<&Value> = verdicts.iter().filter(|v| v["label_example"] == true).collect();
    assert_eq!(shown.len(), dev_labeled.min(2), "{verdicts:?}");
    assert!(shown.iter().all(|v| v["split"] == "dev"));
    let a = &judge["agreement"];
    assert_eq!(a["examples"], shown.len());
    assert_eq!(a["n"].as_u64().unwrap() + a["unscored"].as_u64().unwrap() + a["stale"].as_u64().unwrap() + a["examples"].as_u64().unwrap(), 4);
}
