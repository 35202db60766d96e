//! Does mistral.rs give the same greedy answers with several requests in flight as one at a time,
//! and is it faster? Unpatched 0.8.1 mixed answers up here (`BENCHMARKS.md`); the vendored copy
//! (`vendor/README.md`) must print 0 differing answers. The test suite's proof is
//! `plugins/infer/src/embedded/tests.rs`; this prints the speed too.
//!
//!     cargo run --example concurrency -p infer -- [IN_FLIGHT] [--no-prefix-cache]    (default 8)
//!
//! Loads SmolLM2-135M-Instruct (Q4_1 → Q8_0, as the main job runs it) on the CPU with
//! `max_num_seqs = IN_FLIGHT`, answers 8 prompts one at a time, then all at once, and compares.

use std::time::Instant;

use mistralrs::{GgufModelBuilder, RequestBuilder, TextMessageRole};

const PROMPTS: [&str; 8] = [
    "Explain what the ocean tides are.",
    "Write a short poem about a cat.",
    "What is the Rust programming language good for?",
    "Describe the surface of the moon.",
    "Give three tips for staying focused while studying.",
    "What causes rain?",
    "Summarize the plot of a detective story in a few sentences.",
    "How does a bicycle stay upright?",
];
const MAX_TOKENS: usize = 48;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let in_flight: usize = std::env::args().nth(1).map_or(Ok(8), |a| a.parse())?;
    // `--no-prefix-cache`: mistral.rs reuses KV caches of earlier prompts with a shared prefix.
    let prefix_cache = !std::env::args().any(|a| a == "--no-prefix-cache");
    let catalog = catalog::Catalog::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../catalogs/open-models.toml"))
        .map_err(|d| d[0].render(false))?;
    let source = catalog.get("smollm2-135m-instruct").and_then(|m| m.runnable_source()).ok_or("no SmolLM2 in the catalog")?.clone();
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../catalogs");
    let weights = catalog::fetch::resolve(&source, &base)?;
    let q8 = infer::prepare_q8_0(&weights.path)?;
    let model = GgufModelBuilder::new(q8.parent().unwrap().to_string_lossy(), vec![q8.file_name().unwrap().to_string_lossy()])
        .with_force_cpu()
        .with_max_num_seqs(in_flight)
        .with_prefix_cache_n(if prefix_cache { Some(16) } else { None })
        .build()
        .await?;
    let request = |p: &str| RequestBuilder::new().add_message(TextMessageRole::User, p).set_deterministic_sampler().set_sampler_max_len(MAX_TOKENS);

    let started = Instant::now();
    let mut sequential = Vec::new();
    for p in PROMPTS {
        let r = model.send_chat_request(request(p)).await?;
        sequential.push((r.choices[0].message.content.clone().unwrap_or_default(), r.usage.completion_tokens));
    }
    let seq_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let model = std::sync::Arc::new(model);
    let tasks: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            let (model, request) = (model.clone(), request(p));
            tokio::spawn(async move { model.send_chat_request(request).await })
        })
        .collect();
    let mut concurrent = Vec::new();
    for t in tasks {
        concurrent.push(t.await?);
    }
    let conc_s = started.elapsed().as_secs_f64();

    let seq_tokens: usize = sequential.iter().map(|(_, n)| n).sum();
    let mut conc_tokens = 0;
    let mut differ = 0;
    let mut failed = 0;
    for (i, r) in concurrent.iter().enumerate() {
        match r {
            Ok(r) => {
                let text = r.choices[0].message.content.clone().unwrap_or_default();
                conc_tokens += r.usage.completion_tokens;
                if text != sequential[i].0 {
                    differ += 1;
                    println!("prompt {i} differs:\n  one at a time: {:?}\n  concurrent:    {:?}", short(&sequential[i].0), short(&text));
                }
            }
            Err(e) => {
                failed += 1;
                println!("prompt {i} failed: {e}");
            }
        }
    }
    println!("SmolLM2-135M Q8_0, CPU, {} prompts x {MAX_TOKENS} tokens, greedy, max_num_seqs {in_flight}, prefix cache {}", PROMPTS.len(), if prefix_cache { "on" } else { "off" });
    println!("  one at a time: {seq_tokens} tokens in {seq_s:.2} s = {:.1} tok/s", seq_tokens as f64 / seq_s);
    println!("  all at once:   {conc_tokens} tokens in {conc_s:.2} s = {:.1} tok/s ({:.2}x)", conc_tokens as f64 / conc_s, (conc_tokens as f64 / conc_s) / (seq_tokens as f64 / seq_s));
    println!("  answers that differ from one-at-a-time: {differ} of {}, failed: {failed}", PROMPTS.len());
    Ok(())
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}
