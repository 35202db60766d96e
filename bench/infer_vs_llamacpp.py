#!/usr/bin/env python3
"""Embedded inference (the `infer` stage on mistral.rs) against llama.cpp's own server, same run.

Both engines run the same GGUF (SmolLM2-135M-Instruct Q8_0: the file `prepare = "q8_0"` makes from
the shipped Q4_1, which the main job runs), greedy, on this machine's cores, and both are driven the
way users drive them: `pipeline run` on a pipeline with an `infer` stage, ours embedded, llama.cpp's
`llama-server` (built from the llama.cpp sources vendored in the llama-cpp-python 0.3.36 sdist,
`-DGGML_NATIVE=ON`, continuous batching with `--parallel 8`) through the stage's OpenAI-compatible
client. Workloads:

  eval    the main job's 240 rendered samples (`pipelines/select.toml`'s dataset, prompt template and
          system message; about 133 prompt tokens, at most 8 new, stop at a newline): items/s.
  decode  8 chat prompts x 64 new tokens: tokens/s at 1 in flight, aggregate at 8 in flight.
  ttft    time to first token p50 over 8 prompts one at a time, without and with a shared system
          prompt (~170 tokens; prefix caches on, as both engines default), each engine's own measure
          of its prompt's processing: ours the stage's recorded prefill time, llama.cpp the
          `timings.prompt_ms` of its response (with `prompt_n`, the tokens it processed).

Every measured run starts both engines cold: ours is a new `pipeline run` process, and llama-server
is started afresh before each run. One server kept for the whole bench answered from what earlier
runs left it: a slot still holding the same prompt is picked by its similarity and only the prompt's
last token is processed, and prompts evicted from a slot are kept in a host-memory prompt cache
(`--cache-ram`, 8 GiB by default) and loaded back. The decode prompts at 8 in flight, the repeats and
the time to first token (the decode prompts again) then measured llama.cpp with its prefill skipped.
`--only warm` shows it: the decode prompts at 8 in flight against a fresh server and against one
that has just answered them at 1 in flight, then each asked again (prompt tokens processed).

Throughput is wall time of `pipeline run` minus that of the same pipeline on one sample with one new
token (process start, model load and stage setup; the one tiny request makes both engines look
about 0.1 s faster, the same for both). Each figure is the best of `--repeat` runs (default 2).

    python3 bench/infer_vs_llamacpp.py [--repeat N] [--only eval,decode,ttft,warm]

`PIPELINE_BIN=path` runs that `pipeline` binary instead of building this checkout's.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Explain what the ocean tides are.",
    "Write a short poem about a cat.",
    "What is the Rust programming language good for?",
    "Describe the surface of the moon.",
    "Give three tips for staying focused while studying.",
    "What causes rain?",
    "Summarize the plot of a detective story in a few sentences.",
    "How does a bicycle stay upright?",
]
# A shared system prompt for the TTFT-with-prefix case (about 170 tokens).
SYSTEM = (
    "You are a careful assistant for a public library. Answer in plain language, in at most three "
    "sentences, without lists or headings. If a question is about a fact you are not sure of, say so "
    "instead of guessing. Prefer everyday words over technical terms, and explain any technical term "
    "you do use in a few words. Do not mention these instructions. Do not ask the reader questions "
    "back. Keep a friendly, calm tone, as a librarian at the front desk would. When a question has "
    "several parts, answer each part in order. When a question is ambiguous, answer the most common "
    "reading and say which reading you chose. Never invent book titles, authors or dates. If the "
    "question is about the library itself, say that opening hours and services vary by branch."
)
DECODE_TOKENS = 64
SERVER_SLOTS = 8
CACHE = Path.home() / ".cache/pipeline-llama-server"
LLAMACPP_VERSION = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp we build


def build_llama_server():
    """`llama-server` from the llama.cpp sources in the llama-cpp-python sdist (cached)."""
    binary = CACHE / "build/bin/llama-server"
    if binary.exists():
        return binary
    print(f"building llama-server into {CACHE} (about 10 minutes)", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    venv = CACHE / "venv"
    if not (venv / "bin/cmake").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", "-q", "cmake", "ninja"], check=True)
    sdist = CACHE / f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([str(venv / "bin/pip"), "download", "-q", f"llama-cpp-python=={LLAMACPP_VERSION}",
                        "--no-binary", "llama-cpp-python", "--no-deps", "-d", str(CACHE)], check=True)
    src = CACHE / f"llama_cpp_python-{LLAMACPP_VERSION}"
    if not src.exists():
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(CACHE)], check=True)
    # -march=native enables AMX on CPUs that report it, and AMX `tilezero` dies of SIGILL on this
    # VM (see scripts/test): the same compiler wrappers turn it off after -march=native.
    for name, compiler in (("cc-no-amx", "cc"), ("c++-no-amx", "c++")):
        wrapper = CACHE / name
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/{compiler} "$@" -mno-amx-tile -mno-amx-int8 -mno-amx-bf16\n')
        wrapper.chmod(0o755)
    env = dict(os.environ, CC=str(CACHE / "cc-no-amx"), CXX=str(CACHE / "c++-no-amx"),
               PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    build = CACHE / "build"
    subprocess.run(["cmake", "-S", str(src / "vendor/llama.cpp"), "-B", str(build), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count())],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return binary


class Server:
    def __init__(self, binary, gguf):
        self.binary, self.gguf = binary, gguf
        self.start()

    def start(self):
        binary, gguf = self.binary, self.gguf
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        threads = str(os.cpu_count())
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-t", threads,
             "-tb", threads, "-c", str(2048 * SERVER_SLOTS), "--parallel", str(SERVER_SLOTS), "-a", "smollm2",
             "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                sys.exit(f"llama-server did not come up (exit {self.proc.poll()})")
            time.sleep(0.2)

    def post(self, path, body):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def prompt_timing(self, messages):
        """(seconds, tokens) the server spent processing a greedy chat completion's prompt, by its own timings."""
        body = {"model": "smollm2", "messages": messages, "max_tokens": 8, "temperature": 0}
        timings = self.post("/v1/chat/completions", body)["timings"]
        return timings["prompt_ms"] / 1000, timings["prompt_n"]

    def stop(self):
        self.proc.terminate()
        self.proc.wait()

    def restart(self, catalog_path):
        """A cold server: no slot and no prompt cache holds anything an earlier run sent."""
        self.stop()
        self.start()
        catalog(catalog_path, self.port)


def served_entry(model_id, port, served_model):
    """A catalog entry for SmolLM2 served on loopback as an OpenAI-compatible model."""
    return f"""
[[model]]
id = "{model_id}"
family = "SmolLM2"
developer = "Hugging Face"
origin = "US"
params_total_b = 0.135
params_active_b = 0.135
license = "Apache-2.0"

[[model.source]]
kind = "openai_compatible"
base_urls = ["http://127.0.0.1:{port}/v1"]
model = "{served_model}"
"""


def catalog(path, port):
    """The stock catalog plus llama-server's SmolLM2 as an OpenAI-compatible model."""
    stock = (ROOT / "catalogs/open-models.toml").read_text()
    path.write_text(stock + served_entry("smollm2-llamacpp", port, "smollm2"))


def run_stage(binary, workdir, rows, template, system, sampler, model, in_flight, wrap=()):
    """Runs a fresh `dataset → prompt → render → infer` pipeline; (wall seconds, answers). `wrap`
    is a command the `pipeline run` runs under (`bench/profile_vs_llamacpp.py`: `perf record`)."""
    d = Path(tempfile.mkdtemp(dir=workdir))
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(template, d / "prompt.j2")
    system_line = f"system = {json.dumps(system)}\n" if system else ""
    if model == MODEL:
        engine = f'prepare = "q8_0"\nmax_in_flight = {in_flight}\n'
    else:
        engine = f"http = {{ max_concurrency = {in_flight} }}\n"
    (d / "bench.toml").write_text(f"""
[stages.data]
kind = "dataset"
path = "data.jsonl"
id = "id"
heldout = 0
[stages.prompt]
kind = "prompt"
template = "prompt.j2"
{system_line}
[stages.rendered]
kind = "render"
needs = ["data", "prompt"]
[stages.answers]
kind = "infer"
needs = ["rendered"]
catalog = "{workdir / 'catalog.toml'}"
models = ["{model}"]
sampler = {sampler}
{engine}""")
    t0 = time.perf_counter()
    subprocess.run([*wrap, binary, "run", "bench.toml"], cwd=d, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    out = subprocess.run([binary, "show", "bench.toml", "answers"], cwd=d, check=True, capture_output=True, text=True).stdout
    shutil.rmtree(d)
    return wall, json.loads(out)["models"][model]["answers"]


def throughput(binary, workdir, rows, template, system, sampler, model, in_flight, repeat, cold):
    """(items/s, generated tokens/s, answers) of the best of `repeat` runs, setup subtracted;
    `cold()` runs before each run."""
    def stage(*args):
        cold()
        return run_stage(binary, workdir, *args)
    base = min(stage(rows[:1], template, system, "{ max_tokens = 1 }", model, 1)[0] for _ in range(repeat))
    best, answers = None, None
    for _ in range(repeat):
        wall, answers = stage(rows, template, system, sampler, model, in_flight)
        best = wall if best is None else min(best, wall)
    seconds = best - base
    tokens = sum(a["completion_tokens"] for a in answers)
    return len(rows) / seconds, tokens / seconds, answers


def sweep(binary, workdir, engines, rows, template, system, sampler, repeat):
    """{(model, in flight): (items/s, tokens/s, answers)} for every engine at 1 and 8 in flight."""
    return {(model, n): throughput(binary, workdir, rows, template, system, sampler, model, n, repeat, cold)
            for _, model, cold in engines for n in (1, 8)}


def texts(answers):
    return [a["text"] for a in answers]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default="eval,decode,ttft")  # and `warm`
    args = ap.parse_args()
    only = set(args.only.split(","))
    binary = os.environ.get("PIPELINE_BIN")  # a binary built already, else this checkout's
    if not binary:
        target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        subprocess.run(["cargo", "build", "--locked", "-q"], cwd=ROOT, check=True)
        binary = str(target / "debug/pipeline")
    server_bin = build_llama_server()
    cache = Path(os.environ.get("PIPELINE_MODEL_CACHE", Path.home() / ".cache/pipeline/models")) / SHA
    workdir = Path(tempfile.mkdtemp(prefix="infer-bench-"))
    catalog(workdir / "catalog.toml", 0)
    user = workdir / "user.j2"
    user.write_text("{{ text }}")
    decode_rows = [{"id": f"p{i}", "text": p} for i, p in enumerate(PROMPTS)]
    # Ours first: it makes the Q8_0 file both engines then run.
    run_stage(binary, workdir, decode_rows[:1], user, None, "{ max_tokens = 1 }", MODEL, 1)
    gguf = cache / "SmolLM2-135M-Instruct.Q4_1.to-q8_0-v1.gguf"
    server = Server(server_bin, gguf)
    catalog(workdir / "catalog.toml", server.port)
    engines = [("pipeline infer (mistral.rs)", MODEL, lambda: None),
               ("llama-server", "smollm2-llamacpp", lambda: server.restart(workdir / "catalog.toml"))]
    cores = os.cpu_count()
    print(f"SmolLM2-135M-Instruct Q8_0 ({gguf.name}), greedy, {cores} cores; best of {args.repeat}")
    try:
        if "eval" in only:
            lines = (ROOT / "pipelines/data/tickets.jsonl").read_text().splitlines()
            rows = [{"id": r["id"], "text": r["text"]} for r in map(json.loads, lines)]
            system = "You are a precise support-ticket classifier."
            template = ROOT / "pipelines/prompts/classify.j2"
            print(f"\neval: the main job's {len(rows)} samples, <= 8 new tokens, stop at newline")
            print(f"  {'engine':<30} {'in flight':>9} {'items/s':>8} {'prompt tok/item':>16}")
            got = sweep(binary, workdir, engines, rows, template, system, '{ max_tokens = 8, stop = ["\\n"] }', args.repeat)
            rates = {key: (ips, texts(answers)) for key, (ips, _, answers) in got.items()}
            for name, model, _ in engines:
                for n in (1, 8):
                    ips, _, answers = got[(model, n)]
                    prompt = sum(a["prompt_tokens"] for a in answers) / len(answers)
                    print(f"  {name:<30} {n:>9} {ips:>8.2f} {prompt:>16.1f}")
            ours = max(rates[(MODEL, 1)][0], rates[(MODEL, 8)][0])
            theirs = max(rates[("smollm2-llamacpp", 1)][0], rates[("smollm2-llamacpp", 8)][0])
            print(f"  ratio, best of each (ours / llama.cpp): {ours / theirs:.2f}x")
            same = sum(a == b for a, b in zip(rates[(MODEL, 1)][1], rates[(MODEL, 8)][1]))
            print(f"  ours at 8 in flight == at 1: {same} of {len(rows)}")
            agree = sum(a.strip() == b.strip() for a, b in zip(rates[(MODEL, 1)][1], rates[("smollm2-llamacpp", 1)][1]))
            print(f"  ours == llama.cpp's answer: {agree} of {len(rows)}")
        if "decode" in only:
            print(f"\ndecode: {len(PROMPTS)} prompts x {DECODE_TOKENS} new tokens")
            print(f"  {'engine':<30} {'in flight':>9} {'tok/s':>8}")
            got = {key: (tps, answers) for key, (_, tps, answers) in
                   sweep(binary, workdir, engines, decode_rows, user, None, f"{{ max_tokens = {DECODE_TOKENS} }}", args.repeat).items()}
            for name, model, _ in engines:
                for n in (1, 8):
                    print(f"  {name:<30} {n:>9} {got[(model, n)][0]:>8.1f}")
            for n in (1, 8):
                print(f"  ratio at {n} in flight (ours / llama.cpp): {got[(MODEL, n)][0] / got[('smollm2-llamacpp', n)][0]:.2f}x")
            ours, theirs = got[(MODEL, 1)][1], got[("smollm2-llamacpp", 1)][1]
            same = sum(a["text"].strip() == b["text"].strip() for a, b in zip(ours, theirs))
            print(f"  identical greedy completions, ours vs llama.cpp: {same} of {len(PROMPTS)}")
            # Where do they part? The prompt both engines feed, then the first differing word.
            for row, a, b in zip(decode_rows, ours, theirs):
                rendered = server.post("/apply-template", {"messages": [{"role": "user", "content": row["text"]}]})["prompt"]
                ids = server.post("/tokenize", {"content": rendered, "add_special": True, "parse_special": True})["tokens"]
                wa, wb = a["text"].split(), b["text"].split()
                at = next((i for i, (x, y) in enumerate(zip(wa, wb)) if x != y), min(len(wa), len(wb)))
                print(f"    {row['id']}: prompt tokens ours {a['prompt_tokens']}, llama.cpp {len(ids)}; "
                      f"completion tokens {a['completion_tokens']} / {b['completion_tokens']}; "
                      f"first differing word: {at if a['text'].strip() != b['text'].strip() else '-'}")
        if "ttft" in only:
            print(f"\nttft: p50 over {len(PROMPTS)} prompts, one at a time")
            print(f"  {'engine':<30} {'no shared prefix':>17} {'shared system prompt':>21}")
            system_rows = decode_rows
            for name, model, cold in engines:
                cells = []
                for system in (None, SYSTEM):
                    cold()
                    if model == MODEL:
                        _, answers = run_stage(binary, workdir, system_rows, user, system, "{ max_tokens = 8 }", MODEL, 1)
                        values = [a["timing"]["prefill_ms"] / 1000 for a in answers]
                        processed = None
                    else:
                        values, processed = [], []
                        for row in system_rows:
                            messages = ([{"role": "system", "content": system}] if system else []) + \
                                [{"role": "user", "content": row["text"]}]
                            seconds, tokens = server.prompt_timing(messages)
                            values.append(seconds)
                            processed.append(tokens)
                    cells.append(sorted(values)[len(values) // 2] * 1000)
                    if processed:
                        print(f"    llama-server processed {processed} prompt tokens")
                print(f"  {name:<30} {cells[0]:>14.0f} ms {cells[1]:>18.0f} ms")
        if "warm" in only:
            print(f"\nwarm: llama-server, {len(PROMPTS)} prompts x {DECODE_TOKENS} tokens at 8 in flight, `pipeline run` wall")
            _, model, cold = engines[1]
            sampler = f"{{ max_tokens = {DECODE_TOKENS} }}"
            for _ in range(args.repeat):
                cold()
                fresh = run_stage(binary, workdir, decode_rows, user, None, sampler, model, 8)[0]
                cold()
                run_stage(binary, workdir, decode_rows, user, None, sampler, model, 1)
                warm = run_stage(binary, workdir, decode_rows, user, None, sampler, model, 8)[0]
                again = [server.prompt_timing([{"role": "user", "content": r["text"]}]) for r in decode_rows]
                print(f"  fresh server {fresh:.2f} s, after the same prompts at 1 in flight {warm:.2f} s; asked again, "
                      f"prompt tokens processed {[n for _, n in again]} in {[round(t * 1000) for t, _ in again]} ms")
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
