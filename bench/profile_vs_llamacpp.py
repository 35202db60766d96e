#!/usr/bin/env python3
"""Where the time goes: CPU time by kind of work, the `infer` stage on mistral.rs and llama.cpp's
server, on the same workload in the same run (what `bench/infer_vs_llamacpp.py` times).

Each engine runs the workload once under `perf record` (Linux perf, sampling every thread at
499 Hz), driven as that bench drives it: ours a `pipeline run` of an embedded `infer` stage, from
which the same run on one sample with one new token (process start, model load, stage setup) is
subtracted kind by kind; llama.cpp a fresh `llama-server` recorded while the same `pipeline run`
sends it the same requests through the stage's OpenAI-compatible client. Samples are CPU time on
either core, so a worker that waits by spinning counts. Kinds, by symbol:

  quantized matmul  the Q8_0 matrix products and the quantizing of their inputs (ours: candle's
                    `k_quants`/`avx` kernels; llama.cpp: tinyBLAS, `ggml_vec_dot_q8_0_q8_0`)
  thread pool       handing work out and waiting for it (rayon, crossbeam; llama.cpp: libgomp)
  memory            malloc, free, memmove, memset (libc) and page faults (kernel)
  the rest          everything else: attention, norms, rope, sampling, tensor bookkeeping, HTTP

    python3 bench/profile_vs_llamacpp.py [--only decode,eval] [--top N]

`PIPELINE_BIN=path` profiles that `pipeline` binary instead of building this checkout's.
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import infer_vs_llamacpp as bench  # noqa: E402

HZ = 499
KINDS = [
    ("quantized matmul", re.compile(r"tinyBLAS|ggml_vec_dot_q8_0|quantize_row_q8_0|rx4_vnni|BlockQ8_0|k_quants::matmul|matmul_t|avx::vec_dot")),
    # `Chain<A,B>`: rayon's search for work, inlined into a `Chain::try_fold` of its own (by its
    # address, beside rayon's other code); no other chain of ours shows up in the profiles.
    ("thread pool", re.compile(r"libgomp|rayon|crossbeam|sched_yield|__schedule|yield_now|Chain<A,B>")),
    ("memory", re.compile(r"malloc|free|cfree|memmove|memset|memcpy|page_fault|clear_page|unlink_chunk|_int_realloc")),
]


def kind(symbol):
    return next((name for name, pattern in KINDS if pattern.search(symbol)), "the rest")


def samples(data):
    """[(kind, symbol)] of every sample in a perf.data file."""
    out = subprocess.run(["perf", "script", "-G", "-F", "ip,sym,dso", "-i", str(data)],
                         capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            symbol = parts[1].strip()
            rows.append((kind(symbol), symbol))
    return rows


def seconds_by_kind(rows):
    counts = collections.Counter(k for k, _ in rows)
    return {name: counts[name] / HZ for name in [k for k, _ in KINDS] + ["the rest"]}


def ours(binary, workdir, rows, template, system, sampler, in_flight, data):
    """Runs the stage on the embedded model under perf; the perf.data file."""
    record = ["perf", "record", "-q", "-F", str(HZ), "-o", str(data), "--"]
    bench.run_stage(binary, workdir, rows, template, system, sampler, bench.MODEL, in_flight, wrap=record)
    return data


def theirs(binary, server, workdir, rows, template, system, sampler, in_flight, data):
    """Records the (fresh) llama-server while the stage sends it the workload; the perf.data file."""
    server.restart(workdir / "catalog.toml")
    perf = subprocess.Popen(["perf", "record", "-q", "-F", str(HZ), "-o", str(data), "-p", str(server.proc.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.run_stage(binary, workdir, rows, template, system, sampler, "smollm2-llamacpp", in_flight)
    finally:
        perf.send_signal(2)
        perf.wait()
    return data


def table(title, ours_s, base_s, theirs_s, top_ours, top_theirs, top):
    print(f"\n{title}: CPU seconds on {os.cpu_count()} cores, ours setup subtracted")
    print(f"  {'kind':<18} {'ours':>8} {'llama.cpp':>10} {'ours / llama.cpp':>17}")
    total_o = total_t = 0.0
    for name in ours_s:
        o, t = ours_s[name] - base_s[name], theirs_s[name]
        total_o, total_t = total_o + o, total_t + t
        ratio = f"{o / t:.2f}x" if t > 0 else "-"
        print(f"  {name:<18} {o:>8.2f} {t:>10.2f} {ratio:>17}")
    print(f"  {'all':<18} {total_o:>8.2f} {total_t:>10.2f} {total_o / total_t:>16.2f}x")
    for who, rows in (("ours", top_ours), ("llama.cpp", top_theirs)):
        print(f"  {who}, top symbols (whole run):")
        counts = collections.Counter(rows)
        for (k, symbol), n in counts.most_common(top):
            print(f"    {100 * n / len(rows):5.1f}%  {k:<16}  {symbol[:90]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="decode,eval")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    if shutil.which("perf") is None:
        sys.exit("profile_vs_llamacpp: needs Linux `perf` on PATH (Debian: the linux-perf package)")
    only = set(args.only.split(","))
    binary = os.environ.get("PIPELINE_BIN")
    if not binary:
        target = Path(os.environ.get("CARGO_TARGET_DIR", bench.ROOT / "target"))
        subprocess.run(["cargo", "build", "--locked", "-q"], cwd=bench.ROOT, check=True)
        binary = str(target / "debug/pipeline")
    server_bin = bench.build_llama_server()
    workdir = Path(tempfile.mkdtemp(prefix="infer-profile-"))
    bench.catalog(workdir / "catalog.toml", 0)
    user = workdir / "user.j2"
    user.write_text("{{ text }}")
    decode_rows = [{"id": f"p{i}", "text": p} for i, p in enumerate(bench.PROMPTS)]
    # Ours first: it makes the Q8_0 file both engines then run.
    bench.run_stage(binary, workdir, decode_rows[:1], user, None, "{ max_tokens = 1 }", bench.MODEL, 1)
    cache = Path(os.environ.get("PIPELINE_MODEL_CACHE", Path.home() / ".cache/pipeline/models")) / bench.SHA
    server = bench.Server(server_bin, cache / "SmolLM2-135M-Instruct.Q4_1.to-q8_0-v1.gguf")
    bench.catalog(workdir / "catalog.toml", server.port)
    workloads = []
    if "decode" in only:
        workloads.append(("decode: 8 prompts x 64 new tokens, 8 in flight", decode_rows, user, None, "{ max_tokens = 64 }"))
    if "eval" in only:
        lines = (bench.ROOT / "pipelines/data/tickets.jsonl").read_text().splitlines()
        rows = [{"id": r["id"], "text": r["text"]} for r in map(json.loads, lines)]
        workloads.append((f"eval: the main job's {len(rows)} samples, <= 8 new tokens, 8 in flight", rows,
                          bench.ROOT / "pipelines/prompts/classify.j2", "You are a precise support-ticket classifier.",
                          '{ max_tokens = 8, stop = ["\\n"] }'))
    try:
        base = samples(ours(binary, workdir, decode_rows[:1], user, None, "{ max_tokens = 1 }", 1, workdir / "base.data"))
        for title, rows, template, system, sampler in workloads:
            o = samples(ours(binary, workdir, rows, template, system, sampler, 8, workdir / "ours.data"))
            t = samples(theirs(binary, server, workdir, rows, template, system, sampler, 8, workdir / "theirs.data"))
            table(title, seconds_by_kind(o), seconds_by_kind(base), seconds_by_kind(t), o, t, args.top)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
