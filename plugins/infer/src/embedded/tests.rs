//! Answers do not depend on load: on the real SmolLM2 (Q8_0, as the main job runs it), greedy
//! answers — text, finish reason, token counts — with 2, 8 and 32 requests in flight are bitwise
//! those of one at a time, each load repeated 5 times (the bug this guards against was
//! timing-dependent), with the prefix cache on and off.
//!
//! The 32 requests mix what batching could get wrong: prompts of equal length (on CPU mistral.rs
//! batches only sequences of equal length, so these decode as one batch), prompts of different
//! lengths behind a shared system prompt (prefix-cache hits while others decode), and output
//! constrained to a `choice` and to a `json_schema`, in flight together. Prompts that arrive
//! while others decode run in one forward pass with the decoding rows (fused steps, counted).

use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use super::{LoadOptions, Piece, Runner, StreamedText, load_with};
use crate::{DeviceSpec, Message, OutputConstraint, Prepare, Sampler};

const REPEATS: usize = 5;

struct Request {
    messages: Vec<Message>,
    sampler: Sampler,
    output: Option<OutputConstraint>,
    /// What a sampled answer is drawn with.
    seed: Option<u64>,
}

fn message(role: &str, content: impl Into<String>) -> Message {
    Message { role: role.into(), content: content.into() }
}

fn requests() -> Vec<Request> {
    let sampler = |max_tokens| Sampler { max_tokens, temperature: 0.0, stop: Vec::new() };
    let system = "You answer questions about everyday things in one short sentence.";
    let mut out = Vec::new();
    // Equal length: only the two digits differ, and each digit is one token.
    for n in [12, 34, 56, 78, 21, 43, 65, 87, 19, 28, 37, 46] {
        out.push(Request { messages: vec![message("user", format!("Say something about the number {n}."))], sampler: sampler(8), output: None, seed: None });
    }
    for q in [
        "Why is the sky blue?",
        "What is a bicycle for?",
        "How do plants drink water from the soil?",
        "What does a baker do early in the morning before the shop opens?",
        "Why do cats purr?",
        "What is rain?",
        "How does a refrigerator keep food cold for days?",
        "Name a fruit.",
    ] {
        out.push(Request { messages: vec![message("system", system), message("user", q)], sampler: sampler(6), output: None, seed: None });
    }
    let choice = OutputConstraint::Choice(vec!["yes".into(), "no".into(), "maybe".into()]);
    for q in ["Is water wet?", "Can fish fly?", "Is the moon made of cheese?", "Do birds sing?", "Is ice cold?", "Can a car swim?", "Is fire hot?", "Do trees walk?"] {
        out.push(Request { messages: vec![message("system", system), message("user", q)], sampler: sampler(4), output: Some(choice.clone()), seed: None });
    }
    let schema = OutputConstraint::JsonSchema(json!({
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": false
    }));
    for (a, b) in [(3, 4), (10, 20), (7, 1), (42, 17)] {
        out.push(Request {
            messages: vec![message("user", format!("Return the numbers {a} and {b} as JSON with keys a and b."))],
            sampler: sampler(32),
            output: Some(schema.clone()),
            seed: None,
        });
    }
    out
}

/// What must not change with load.
type Outcome = (String, String, usize, usize);

async fn answer(runner: &Runner, r: &Request) -> Outcome {
    let a = runner.chat(&r.messages, &r.sampler, r.output.as_ref(), r.seed).await.expect("the model answers");
    assert!(!a.redone_alone, "a request failed under load and was redone alone");
    (a.text, a.finish_reason, a.prompt_tokens, a.completion_tokens)
}

/// Every request, at most `in_flight` at once (each task takes the next request when it is free).
async fn run_all(runner: &Arc<Runner>, requests: &Arc<Vec<Request>>, in_flight: usize) -> Vec<Outcome> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (runner, requests, next) = (runner.clone(), requests.clone(), next.clone());
        tasks.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(r) = requests.get(i) else { break };
                done.push((i, answer(&runner, r).await));
            }
            done
        });
    }
    let mut out: Vec<Option<Outcome>> = (0..requests.len()).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        for (i, o) in done.expect("no task panics") {
            out[i] = Some(o);
        }
    }
    out.into_iter().map(|o| o.expect("every request answered")).collect()
}

async fn runner(prefix_cache: bool) -> Arc<Runner> {
    let catalog_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../catalogs/open-models.toml");
    let catalog = catalog::Catalog::load(&catalog_path).map_err(|d| d[0].render(false)).expect("the catalog loads");
    let model = catalog.get("smollm2-135m-instruct").expect("SmolLM2 is in the catalog");
    let source = model.runnable_source().expect("SmolLM2 has weights").clone();
    let catalog::Source::PythonPackage { sha256, .. } = &source else { panic!("SmolLM2 ships in a Python package") };
    load_with(&source, sha256, catalog_path.parent().unwrap(), Some(Prepare::Q8_0), DeviceSpec::Cpu, LoadOptions { prefix_cache })
        .await
        .expect("SmolLM2 loads")
}

async fn check_independent_of_load(prefix_cache: bool) -> Vec<Outcome> {
    let runner = runner(prefix_cache).await;
    // A Llama-architecture GGUF on CPU: its requests batch (else the load below would test nothing).
    assert!(!runner.one_at_a_time, "SmolLM2's requests would run one at a time");
    let requests = Arc::new(requests());
    let alone = run_all(&runner, &requests, 1).await;
    // The equal-length prompts really are of equal length, so they batch.
    let lengths: Vec<usize> = alone[..12].iter().map(|o| o.2).collect();
    assert!(lengths.iter().all(|&n| n == lengths[0]), "equal-length prompts tokenize to {lengths:?}");
    // The constrained outputs hold to their constraints (else this would test little).
    for o in &alone[20..28] {
        assert!(["yes", "no", "maybe"].contains(&o.0.as_str()), "choice gave {:?}", o.0);
    }
    assert_eq!(alone.len(), 32);
    for o in &alone[28..] {
        let v: serde_json::Value = serde_json::from_str(&o.0).unwrap_or_else(|e| panic!("json_schema gave {:?}: {e}", o.0));
        assert!(v["a"].is_i64() && v["b"].is_i64(), "json_schema gave {v}");
    }
    for in_flight in [2, 8, 32] {
        let fused = mistralrs::core::FUSED_STEPS.load(std::sync::atomic::Ordering::Relaxed);
        for repeat in 0..REPEATS {
            let started = std::time::Instant::now();
            let loaded = run_all(&runner, &requests, in_flight).await;
            eprintln!("prefix cache {prefix_cache}, {in_flight} in flight, repeat {repeat}: {:.1} s", started.elapsed().as_secs_f64());
            for (i, (one, many)) in alone.iter().zip(&loaded).enumerate() {
                assert_eq!(one, many, "request {i} at {in_flight} in flight (repeat {repeat}, prefix cache {prefix_cache}) differs from one at a time");
            }
        }
        // Prompts joined while others decoded, in one forward pass with them (vendor/README.md,
        // mistralrs-core 15): else the comparison above never saw that path.
        let fused = mistralrs::core::FUSED_STEPS.load(std::sync::atomic::Ordering::Relaxed) - fused;
        assert!(fused > 0, "no prompt ran in one pass with decoding rows at {in_flight} in flight");
        eprintln!("prefix cache {prefix_cache}, {in_flight} in flight: {fused} fused steps");
    }
    alone
}

/// A streamed answer is the unstreamed one: its pieces add up to the text, with the same finish
/// reason and token counts, eight streams in flight at once. The questions behind the system
/// prompt stop at strings a token can end inside of ("ing "), so streamed text must be held back
/// until it cannot begin one; the rest are as above (equal lengths, `choice`, `json_schema`).
async fn check_streamed_is_whole(runner: &Arc<Runner>) {
    let mut requests = requests();
    for r in &mut requests[12..20] {
        r.sampler = Sampler { max_tokens: 16, temperature: 0.0, stop: vec![".".into(), "ing ".into()] };
    }
    let requests = Arc::new(requests);
    let whole = run_all(runner, &requests, 1).await;
    let mut streamed = Vec::new();
    for batch in (0..requests.len()).collect::<Vec<_>>().chunks(8) {
        let mut tasks = tokio::task::JoinSet::new();
        for &i in batch {
            let r = &requests[i];
            let mut pieces = runner.stream(r.messages.clone(), r.sampler.clone(), r.output.clone(), r.seed);
            tasks.spawn(async move {
                let mut text = String::new();
                loop {
                    match pieces.recv().await.expect("the stream ends with the answer").expect("the model answers") {
                        Piece::Text(t) => text.push_str(&t),
                        Piece::Done(a) => return (i, text, a),
                    }
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            streamed.push(done.expect("no task panics"));
        }
    }
    streamed.sort_by_key(|s| s.0);
    for (i, text, a) in streamed {
        assert_eq!(text, a.text, "request {i}: the streamed pieces are not the streamed answer");
        assert_eq!((a.text, a.finish_reason, a.prompt_tokens, a.completion_tokens), whole[i], "request {i}: streamed differs from unstreamed");
    }
    let cut = whole[12..20].iter().filter(|o| o.1 == "stop" && o.3 < 16).count();
    eprintln!("stop strings: {cut} of 8 answers stopped early: {:?}", whole[12..20].iter().map(|o| &o.0).collect::<Vec<_>>());
}

/// How a stream of mistral.rs pieces (which carry leading whitespace and stop strings) is given
/// out: a prefix of the final text at every step, and all of it at the end.
#[test]
fn streamed_text_is_the_whole_text_as_it_grows() {
    let cases: &[(&[&str], &[&str], &str)] = &[
        (&[" Hello", " world", "."], &[], "Hello world."),
        (&["  ", " ", "Hi", " there"], &["\n"], "Hi there"),
        // A stop string inside one piece, and one across pieces.
        (&["one", " two.", " three"], &["."], "one two"),
        (&["sing", "ing", " a", " song"], &["ing a"], "sing"),
        (&["ab", "c", "d"], &["cde"], "abcd"),
        // The earliest stop string wins, whichever is listed first.
        (&["x", "yz", "w"], &["zw", "y"], "x"),
        (&["caf", "é", " au", " lait"], &["é a"], "caf"),
        (&[], &["."], ""),
    ];
    for (pieces, stop, whole) in cases {
        let mut text = StreamedText::new(stop.iter().map(|s| s.to_string()).collect());
        let mut given = String::new();
        let mut last = String::new();
        for p in *pieces {
            last = text.push(p);
            given.push_str(&last);
            assert!(whole.starts_with(given.as_str()), "{pieces:?} / {stop:?}: gave {given:?}, not a prefix of {whole:?}");
        }
        given.truncate(given.len() - last.len());
        let (rest, all) = text.finish(last);
        given.push_str(&rest);
        assert_eq!((given.as_str(), all.as_str()), (*whole, *whole), "{pieces:?} / {stop:?}");
    }
}

/// Sampled answers (temperature 1) are drawn from each request's own seeded stream: the same at 8
/// in flight as one at a time (each load twice), others under other seeds, and not the greedy
/// answers (the temperature is honoured).
async fn check_seeded_sampling(runner: &Arc<Runner>) {
    let with = |seed: u64, temperature: f64| -> Arc<Vec<Request>> {
        Arc::new(
            requests()
                .into_iter()
                .map(|r| Request { sampler: Sampler { temperature, ..r.sampler }, seed: Some(seed), ..r })
                .collect(),
        )
    };
    let sampled = with(7, 1.0);
    let alone = run_all(runner, &sampled, 1).await;
    for round in 0..2 {
        let loaded = run_all(runner, &sampled, 8).await;
        for (i, (one, many)) in alone.iter().zip(&loaded).enumerate() {
            assert_eq!(one, many, "sampled request {i} at 8 in flight (round {round}) differs from one at a time");
        }
    }
    let greedy = run_all(runner, &with(7, 0.0), 1).await;
    let other_seed = run_all(runner, &with(8, 1.0), 1).await;
    let differ = |a: &[Outcome], b: &[Outcome]| a.iter().zip(b).filter(|(x, y)| x.0 != y.0).count();
    eprintln!("sampled: {} of 32 differ from greedy, {} from seed 8", differ(&alone, &greedy), differ(&alone, &other_seed));
    assert!(differ(&alone, &greedy) >= 8, "sampling at temperature 1 gave the greedy answers");
    assert!(differ(&alone, &other_seed) >= 8, "another seed drew the same answers");
    // Constraints hold while sampling.
    for o in &alone[20..28] {
        assert!(["yes", "no", "maybe"].contains(&o.0.as_str()), "sampled choice gave {:?}", o.0);
    }
}

/// One test, the settings one after the other: two models decoding at once on two cores would
/// only slow each other down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_answers_do_not_depend_on_load() {
    let cached_runner = runner(true).await;
    check_streamed_is_whole(&cached_runner).await;
    check_seeded_sampling(&cached_runner).await;
    drop(cached_runner);
    let cached = check_independent_of_load(true).await;
    let uncached = check_independent_of_load(false).await;
    // A prefix-cache hit computes what a full prefill computes.
    assert_eq!(cached, uncached, "answers with the prefix cache differ from answers without it");
}
